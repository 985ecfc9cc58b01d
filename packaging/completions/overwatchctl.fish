# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_overwatchctl_global_optspecs
    string join \n socket= h/help V/version
end

function __fish_overwatchctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_overwatchctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_overwatchctl_using_subcommand
    set -l cmd (__fish_overwatchctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -l socket -d 'The control socket' -r -F
complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -s h -l help -d 'Print help'
complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -s V -l version -d 'Print version'
complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -f -a "status" -d 'Instances, listeners and operations at a glance'
complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -f -a "restart-all" -d 'Rolling restart of every instance, optionally with new counts'
complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -f -a "deploy" -d 'Pull, build beside the live app, and roll the instances onto the new build'
complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -f -a "upgrade" -d 'Replace the running Overwatch binary without closing a listener'
complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -f -a "reload" -d 'Re-read the config and certificates and apply them without downtime'
complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -f -a "rollback" -d 'Switch back to the previous kept release with a rolling restart'
complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -f -a "logs" -d 'Show instance logs'
complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -f -a "console" -d 'Interactive console with line editing and history'
complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -f -a "generate" -d 'Internal: write the man page and shell completions into DIR (packaging/ in the repo)'
complete -c overwatchctl -n "__fish_overwatchctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand status" -l socket -d 'The control socket' -r -F
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand status" -l json -d 'Machine-readable output (schema: docs/status-json.md)'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand status" -s h -l help -d 'Print help'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand restart-all" -l ssl -d 'HTTPS instances' -r
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand restart-all" -l http -d 'HTTP instances' -r
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand restart-all" -l root -d 'Whether the root instance runs' -r -f -a "true\t''
false\t''"
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand restart-all" -l socket -d 'The control socket' -r -F
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand restart-all" -s h -l help -d 'Print help'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand deploy" -l ssl -d 'HTTPS instances' -r
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand deploy" -l http -d 'HTTP instances' -r
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand deploy" -l root -d 'Whether the root instance runs' -r -f -a "true\t''
false\t''"
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand deploy" -l persistent -r -f -a "true\t''
false\t''"
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand deploy" -l delete-old -r -f -a "true\t''
false\t''"
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand deploy" -l socket -d 'The control socket' -r -F
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand deploy" -s h -l help -d 'Print help'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand upgrade" -l binary -r -F
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand upgrade" -l socket -d 'The control socket' -r -F
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand upgrade" -s h -l help -d 'Print help'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand reload" -l socket -d 'The control socket' -r -F
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand reload" -s h -l help -d 'Print help'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand rollback" -l socket -d 'The control socket' -r -F
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand rollback" -s h -l help -d 'Print help'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand logs" -s n -l lines -r
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand logs" -l socket -d 'The control socket' -r -F
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand logs" -s f -l follow
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand logs" -s h -l help -d 'Print help'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand console" -l socket -d 'The control socket' -r -F
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand console" -s h -l help -d 'Print help'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand generate" -l socket -d 'The control socket' -r -F
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand generate" -s h -l help -d 'Print help'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand help; and not __fish_seen_subcommand_from status restart-all deploy upgrade reload rollback logs console generate help" -f -a "status" -d 'Instances, listeners and operations at a glance'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand help; and not __fish_seen_subcommand_from status restart-all deploy upgrade reload rollback logs console generate help" -f -a "restart-all" -d 'Rolling restart of every instance, optionally with new counts'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand help; and not __fish_seen_subcommand_from status restart-all deploy upgrade reload rollback logs console generate help" -f -a "deploy" -d 'Pull, build beside the live app, and roll the instances onto the new build'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand help; and not __fish_seen_subcommand_from status restart-all deploy upgrade reload rollback logs console generate help" -f -a "upgrade" -d 'Replace the running Overwatch binary without closing a listener'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand help; and not __fish_seen_subcommand_from status restart-all deploy upgrade reload rollback logs console generate help" -f -a "reload" -d 'Re-read the config and certificates and apply them without downtime'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand help; and not __fish_seen_subcommand_from status restart-all deploy upgrade reload rollback logs console generate help" -f -a "rollback" -d 'Switch back to the previous kept release with a rolling restart'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand help; and not __fish_seen_subcommand_from status restart-all deploy upgrade reload rollback logs console generate help" -f -a "logs" -d 'Show instance logs'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand help; and not __fish_seen_subcommand_from status restart-all deploy upgrade reload rollback logs console generate help" -f -a "console" -d 'Interactive console with line editing and history'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand help; and not __fish_seen_subcommand_from status restart-all deploy upgrade reload rollback logs console generate help" -f -a "generate" -d 'Internal: write the man page and shell completions into DIR (packaging/ in the repo)'
complete -c overwatchctl -n "__fish_overwatchctl_using_subcommand help; and not __fish_seen_subcommand_from status restart-all deploy upgrade reload rollback logs console generate help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
