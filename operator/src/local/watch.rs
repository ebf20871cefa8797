//! Noticing edits of the pipeline file.
//!
//! The file's content hash is polled (local mode does it about once a second) rather than using
//! filesystem notifications: polling needs no extra crate, works on every filesystem, and sees
//! both in-place writes and the write-then-rename saves of most editors. Comparing content rather
//! than modification times also ignores saves that change nothing.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What one look at the file found.
#[derive(Debug, PartialEq, Eq)]
pub enum FileEvent {
    /// Same content as last time (or the same problem as last time, already reported).
    Unchanged,
    /// New content.
    Changed(String),
    /// The file cannot be read (or is not UTF-8); reported once until the problem changes.
    Unreadable(String),
}

/// Remembers the last content seen of one file.
#[derive(Debug)]
pub struct FileWatcher {
    path: PathBuf,
    last_digest: [u8; 32],
    last_problem: Option<String>,
}

impl FileWatcher {
    /// Watches `path`, whose current content is `initial` (already loaded by the caller).
    pub fn new(path: &Path, initial: &str) -> Self {
        Self {
            path: path.to_path_buf(),
            last_digest: digest(initial.as_bytes()),
            last_problem: None,
        }
    }

    /// Reads the file and reports whether its content changed since the last call.
    pub fn poll(&mut self) -> FileEvent {
        let read = std::fs::read(&self.path).map_err(|error| error.to_string());
        self.observe(read)
    }

    /// The decision behind [`FileWatcher::poll`], given what reading the file returned.
    fn observe(&mut self, read: Result<Vec<u8>, String>) -> FileEvent {
        let text = read.and_then(|bytes| {
            String::from_utf8(bytes).map_err(|_| "the file is not UTF-8 text".to_string())
        });
        match text {
            Ok(text) => {
                self.last_problem = None;
                let new_digest = digest(text.as_bytes());
                if new_digest == self.last_digest {
                    FileEvent::Unchanged
                } else {
                    self.last_digest = new_digest;
                    FileEvent::Changed(text)
                }
            }
            Err(problem) if self.last_problem.as_deref() == Some(problem.as_str()) => {
                FileEvent::Unchanged
            }
            Err(problem) => {
                self.last_problem = Some(problem.clone());
                FileEvent::Unreadable(problem)
            }
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_each_new_content_once() {
        let mut watcher = FileWatcher::new(Path::new("unused"), "a");
        assert_eq!(watcher.observe(Ok(b"a".to_vec())), FileEvent::Unchanged);
        assert_eq!(
            watcher.observe(Ok(b"b".to_vec())),
            FileEvent::Changed("b".into())
        );
        assert_eq!(watcher.observe(Ok(b"b".to_vec())), FileEvent::Unchanged);
        // Back to the first content is a change too.
        assert_eq!(
            watcher.observe(Ok(b"a".to_vec())),
            FileEvent::Changed("a".into())
        );
    }

    #[test]
    fn reports_a_problem_once_and_a_recovery_only_if_the_content_changed() {
        let mut watcher = FileWatcher::new(Path::new("unused"), "a");
        let gone = || Err("No such file or directory".to_string());
        assert!(matches!(watcher.observe(gone()), FileEvent::Unreadable(_)));
        assert_eq!(watcher.observe(gone()), FileEvent::Unchanged);
        // An editor that renamed the file back in place with the same content changed nothing.
        assert_eq!(watcher.observe(Ok(b"a".to_vec())), FileEvent::Unchanged);
        assert!(matches!(
            watcher.observe(Ok(vec![0xff, 0xfe])),
            FileEvent::Unreadable(p) if p.contains("UTF-8")
        ));
    }

    #[test]
    fn polls_a_real_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pipeline.yaml");
        std::fs::write(&path, "one").unwrap();
        let mut watcher = FileWatcher::new(&path, "one");
        assert_eq!(watcher.poll(), FileEvent::Unchanged);
        std::fs::write(&path, "two").unwrap();
        assert_eq!(watcher.poll(), FileEvent::Changed("two".into()));
    }
}
