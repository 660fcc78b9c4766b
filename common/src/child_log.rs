//! Reading a child process's JSON log lines (`--log-format json`, as [`crate::logging`] writes
//! them) from its piped stderr: what the tests that run the binaries wait on.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::{Context, bail};

/// A child's stderr lines, forwarded by a thread until the child closes the pipe.
#[derive(Debug)]
pub struct ChildLog {
    lines: Receiver<String>,
    /// Messages of the lines [`wait_for`](Self::wait_for) read, in order.
    seen: std::cell::RefCell<Vec<String>>,
}

impl ChildLog {
    /// Takes `child`'s stderr (spawned with `Stdio::piped()`) and forwards its lines. The
    /// thread keeps reading after start-up: a pipe nobody reads fills up, and a closed one
    /// fails the child's log writes.
    pub fn forward(child: &mut Child) -> anyhow::Result<Self> {
        let stderr = child.stderr.take().context("the child's stderr is not piped")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Ok(Self { lines, seen: Default::default() })
    }

    /// Skips lines up to the first whose message is `message` and returns that line's
    /// `fields`. Fails when no line comes for `timeout` or the child closes its stderr first.
    pub fn wait_for(&self, message: &str, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        loop {
            let line = match self.lines.recv_timeout(timeout) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    bail!("no log line for {timeout:?} while waiting for {message:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the child closed its stderr before logging {message:?}")
                }
            };
            let mut v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(m) = v["fields"]["message"].as_str() {
                self.seen.borrow_mut().push(m.to_owned());
            }
            if v["fields"]["message"] == message {
                return Ok(v["fields"].take());
            }
        }
    }

    /// The messages of every line [`wait_for`](Self::wait_for) has read so far (the ones it
    /// skipped too), in order.
    pub fn seen(&self) -> Vec<String> {
        self.seen.borrow().clone()
    }

    /// The lines not read yet, up to the child closing its stderr: call it once the child
    /// exited, or it waits for that.
    pub fn rest(self) -> Vec<String> {
        self.lines.into_iter().collect()
    }

    /// Writes the lines not read yet to `out`, one per line, on a thread of its own until the
    /// child closes its stderr: for a child that runs long after start-up (nothing piles up in
    /// memory).
    pub fn copy_to(self, mut out: impl std::io::Write + Send + 'static) {
        std::thread::spawn(move || {
            for line in self.lines {
                if writeln!(out, "{line}").is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    fn child(script: &str) -> Child {
        Command::new("sh").args(["-c", script]).stderr(Stdio::piped()).spawn().unwrap()
    }

    #[test]
    fn waits_for_the_message_and_keeps_the_rest() {
        let mut c = child(
            r#"echo 'not json' >&2
               echo '{"fields":{"message":"other"}}' >&2
               echo '{"fields":{"message":"listening","addr":"127.0.0.1:7"}}' >&2
               echo 'after' >&2"#,
        );
        let log = ChildLog::forward(&mut c).unwrap();
        let fields = log.wait_for("listening", Duration::from_secs(30)).unwrap();
        assert_eq!(fields["addr"], "127.0.0.1:7");
        assert_eq!(log.seen(), ["other", "listening"]);
        c.wait().unwrap();
        assert_eq!(log.rest(), ["after"]);
    }

    #[test]
    fn a_child_that_exits_without_the_message_is_an_error() {
        let mut c = child("echo '{\"fields\":{\"message\":\"other\"}}' >&2");
        let log = ChildLog::forward(&mut c).unwrap();
        let e = log.wait_for("ready", Duration::from_secs(30)).unwrap_err();
        assert!(e.to_string().contains("closed its stderr"), "{e}");
        c.wait().unwrap();
    }
}
