//! Instance log files: where they live, reading the last lines, and following new ones.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use protocol::Pool;

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("no instance named {name:?}: use https-N, http-N or root")]
    BadName { name: String },
    #[error("no log for {name} at {path}")]
    Missing { name: String, path: PathBuf },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
}

pub fn log_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("logs")
}

/// `<state_dir>/logs/<pool>-<index>.log`
pub fn log_path(state_dir: &Path, pool: Pool, index: u32) -> PathBuf {
    log_dir(state_dir).join(format!("{pool}-{index}.log"))
}

/// `https-0`, `http-1`; the root instance is `root`.
pub fn instance_name(pool: Pool, index: u32) -> String {
    match pool {
        Pool::Root if index == 0 => "root".to_string(),
        _ => format!("{pool}-{index}"),
    }
}

/// Parses `https-0`, `http-1`, `root` or `root-0`; anything else (a path, say) is refused.
pub fn parse_instance_name(name: &str) -> Result<(Pool, u32), LogsError> {
    let bad = || LogsError::BadName {
        name: name.to_string(),
    };
    if name == "root" {
        return Ok((Pool::Root, 0));
    }
    let (pool, index) = name.rsplit_once('-').ok_or_else(bad)?;
    let pool = Pool::ALL
        .into_iter()
        .find(|p| p.name() == pool)
        .ok_or_else(bad)?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) || index.len() > 6 {
        return Err(bad());
    }
    let index: u32 = index.parse().map_err(|_| bad())?;
    if pool == Pool::Root && index != 0 {
        return Err(bad());
    }
    Ok((pool, index))
}

/// Every `*.log` in the log directory as (instance name, path), sorted by name.
pub fn all_logs(state_dir: &Path) -> Vec<(String, PathBuf)> {
    let mut logs: Vec<(String, PathBuf)> = std::fs::read_dir(log_dir(state_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let stem = path.file_stem()?.to_str()?.to_string();
            (path.extension()? == "log").then_some((stem, path))
        })
        .collect();
    logs.sort();
    logs
}

const CHUNK: u64 = 8192;

/// The last `n` lines of the first `end` bytes of `file` (invalid UTF-8 replaced), reading
/// backwards in chunks so a large log costs only its tail.
pub fn tail(file: &mut File, end: u64, n: usize) -> io::Result<Vec<String>> {
    if n == 0 || end == 0 {
        return Ok(Vec::new());
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = end;
    loop {
        let newlines = buf.iter().filter(|&&b| b == b'\n').count();
        // One more newline than lines wanted: the one ending the line before them.
        if newlines > n || pos == 0 {
            break;
        }
        let start = pos.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; (pos - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
        pos = start;
    }
    let text = String::from_utf8_lossy(&buf);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let lines: Vec<&str> = text.split('\n').collect();
    let skip = lines.len().saturating_sub(n);
    Ok(lines[skip..]
        .iter()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect())
}

/// Reads complete lines appended to a file since the last poll; starts over if the file
/// shrank (it was truncated or replaced).
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    pos: u64,
    partial: Vec<u8>,
}

impl Follower {
    pub fn new(path: PathBuf, pos: u64) -> Self {
        Follower {
            path,
            pos,
            partial: Vec::new(),
        }
    }

    pub fn poll(&mut self) -> Result<Vec<String>, LogsError> {
        let read = |e| LogsError::Read {
            path: self.path.clone(),
            source: e,
        };
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(read(e)),
        };
        let len = file.metadata().map_err(read)?.len();
        if len < self.pos {
            self.pos = 0;
            self.partial.clear();
        }
        if len == self.pos {
            return Ok(Vec::new());
        }
        file.seek(SeekFrom::Start(self.pos)).map_err(read)?;
        let mut new = Vec::new();
        file.take(len - self.pos)
            .read_to_end(&mut new)
            .map_err(read)?;
        self.pos += new.len() as u64;
        self.partial.extend_from_slice(&new);
        let Some(last_nl) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let rest = self.partial.split_off(last_nl + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        Ok(String::from_utf8_lossy(&complete[..last_nl])
            .split('\n')
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect())
    }
}

/// The last `n` lines of `path` and a follower positioned right after them.
pub fn tail_path(name: &str, path: &Path, n: usize) -> Result<(Vec<String>, Follower), LogsError> {
    let mut file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => LogsError::Missing {
            name: name.to_string(),
            path: path.to_path_buf(),
        },
        _ => LogsError::Read {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    let read = |e| LogsError::Read {
        path: path.to_path_buf(),
        source: e,
    };
    let end = file.metadata().map_err(read)?.len();
    let lines = tail(&mut file, end, n).map_err(read)?;
    Ok((lines, Follower::new(path.to_path_buf(), end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(contents: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, contents).unwrap();
        (dir, path)
    }

    #[test]
    fn tail_returns_the_last_lines() {
        let (_d, path) = file_with(b"one\ntwo\nthree\nfour\n");
        let (lines, _) = tail_path("x", &path, 2).unwrap();
        assert_eq!(lines, ["three", "four"]);
        let (lines, _) = tail_path("x", &path, 10).unwrap();
        assert_eq!(lines, ["one", "two", "three", "four"]);
        let (lines, _) = tail_path("x", &path, 0).unwrap();
        assert!(lines.is_empty());
    }

    #[test]
    fn tail_handles_no_final_newline_and_large_files() {
        let (_d, path) = file_with(b"a\nb\nunfinished");
        assert_eq!(tail_path("x", &path, 2).unwrap().0, ["b", "unfinished"]);
        let mut big = Vec::new();
        for i in 0..20_000 {
            writeln!(big, "line {i}").unwrap();
        }
        let (_d2, path) = file_with(&big);
        assert_eq!(
            tail_path("x", &path, 3).unwrap().0,
            ["line 19997", "line 19998", "line 19999"]
        );
        assert_eq!(tail_path("x", &path, 5000).unwrap().0.len(), 5000);
    }

    #[test]
    fn missing_file_is_a_named_error() {
        let err = tail_path("http-3", Path::new("/nonexistent/http-3.log"), 5).unwrap_err();
        assert!(err.to_string().contains("no log for http-3"), "{err}");
    }

    #[test]
    fn follower_yields_complete_new_lines_and_survives_truncation() {
        let (_d, path) = file_with(b"old\n");
        let (_, mut follow) = tail_path("x", &path, 1).unwrap();
        assert!(follow.poll().unwrap().is_empty());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"new 1\nnew ").unwrap();
        assert_eq!(follow.poll().unwrap(), ["new 1"]);
        f.write_all(b"2\n").unwrap();
        assert_eq!(follow.poll().unwrap(), ["new 2"]);
        std::fs::write(&path, b"fresh\n").unwrap();
        assert_eq!(follow.poll().unwrap(), ["fresh"]);
    }

    #[test]
    fn instance_names_parse_strictly() {
        assert_eq!(parse_instance_name("https-0").unwrap(), (Pool::Https, 0));
        assert_eq!(parse_instance_name("http-12").unwrap(), (Pool::Http, 12));
        assert_eq!(parse_instance_name("root").unwrap(), (Pool::Root, 0));
        assert_eq!(parse_instance_name("root-0").unwrap(), (Pool::Root, 0));
        for bad in [
            "",
            "http",
            "http-",
            "http-x",
            "../etc/passwd",
            "http-1/../../x",
            "root-1",
            "ftp-0",
            "http--1",
        ] {
            assert!(parse_instance_name(bad).is_err(), "{bad}");
        }
        assert_eq!(instance_name(Pool::Root, 0), "root");
        assert_eq!(
            log_path(Path::new("/s"), Pool::Http, 1),
            Path::new("/s/logs/http-1.log")
        );
        assert_eq!(
            log_path(Path::new("/s"), Pool::Root, 0),
            Path::new("/s/logs/root-0.log")
        );
    }
}

/// How often instance logs are checked against `[log].max_size`.
pub const ROTATE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Rotates every `*.log` in `dir` larger than `max_size`: `x.log.N` are shifted up (the one
/// past `keep` is removed), the live file is copied to `x.log.1` and truncated. Instances write
/// with `O_APPEND`, so they carry on at the start of the emptied file (copytruncate: a line
/// written between the copy and the truncation can be lost). Returns the files rotated.
pub fn rotate_once(dir: &Path, max_size: u64, keep: u32) -> io::Result<Vec<PathBuf>> {
    let mut rotated = Vec::new();
    if max_size == 0 {
        return Ok(rotated);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("log") {
            continue;
        }
        if std::fs::metadata(&path)?.len() <= max_size {
            continue;
        }
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
        if keep == 0 {
            File::options().write(true).open(&path)?.set_len(0)?;
            rotated.push(path);
            continue;
        }
        let _ = std::fs::remove_file(numbered(keep));
        for n in (1..keep).rev() {
            if numbered(n).exists() {
                std::fs::rename(numbered(n), numbered(n + 1))?;
            }
        }
        std::fs::copy(&path, numbered(1))?;
        File::options().write(true).open(&path)?.set_len(0)?;
        rotated.push(path);
    }
    Ok(rotated)
}

/// Runs [`rotate_once`] every [`ROTATE_EVERY`] for the life of the worker.
pub async fn rotate_forever(dir: PathBuf, max_size: u64, keep: u32) {
    let mut tick = tokio::time::interval(ROTATE_EVERY);
    loop {
        tick.tick().await;
        let (d, m, k) = (dir.clone(), max_size, keep);
        match tokio::task::spawn_blocking(move || rotate_once(&d, m, k)).await {
            Ok(Ok(files)) => {
                for f in files {
                    tracing::info!(file = %f.display(), "instance log rotated");
                }
            }
            Ok(Err(e)) => tracing::warn!(dir = %dir.display(), "log rotation: {e}"),
            Err(e) => tracing::warn!("log rotation task: {e}"),
        }
    }
}

#[cfg(test)]
mod rotate_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rotates_past_max_size_and_keeps_n() {
        let dir = std::env::temp_dir().join(format!("ow-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let live = dir.join("http-0.log");
        let mut writer = File::options()
            .create(true)
            .append(true)
            .open(&live)
            .unwrap();
        for round in 0..4 {
            writer
                .write_all(format!("round {round} {}\n", "x".repeat(100)).as_bytes())
                .unwrap();
            assert_eq!(rotate_once(&dir, 50, 2).unwrap(), vec![live.clone()]);
        }
        // The writer keeps appending to the emptied live file.
        writer.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read_to_string(&live).unwrap(), "after\n");
        assert!(std::fs::read_to_string(dir.join("http-0.log.1"))
            .unwrap()
            .starts_with("round 3"));
        assert!(std::fs::read_to_string(dir.join("http-0.log.2"))
            .unwrap()
            .starts_with("round 2"));
        assert!(!dir.join("http-0.log.3").exists());
        assert!(rotate_once(&dir, 50, 2).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
