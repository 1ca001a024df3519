//! The one boundary through which backends run kernel tools (iptables-restore, nft, ...).
//! The recording fake lets renderer+applier logic be tested without root.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

/// Exit status and output of a tool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutput {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// The first three lines of stderr on one line, for an error message.
    pub fn stderr_summary(&self) -> String {
        summarize_stderr(&self.stderr)
    }
}

/// The first three lines of a tool's stderr on one line (`a | b | c`).
pub fn summarize_stderr(stderr: &str) -> String {
    stderr
        .trim()
        .lines()
        .take(3)
        .collect::<Vec<_>>()
        .join(" | ")
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs a program with arguments and optional stdin. Arguments are passed as a vector,
/// never through a shell.
pub trait CommandRunner: Send + Sync {
    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<CommandOutput, CommandError>;

    /// Like [`CommandRunner::run`], with the program's standard output thrown away (for a
    /// tool that may print megabytes nobody reads; `stdout` comes back empty).
    fn run_discarding_stdout(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<CommandOutput, CommandError> {
        self.run(program, args, stdin)
    }
}

/// Runs real programs.
#[derive(Debug, Default, Clone)]
pub struct SystemRunner;

impl CommandRunner for SystemRunner {
    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<CommandOutput, CommandError> {
        run_system(program, args, stdin, Stdio::piped())
    }

    fn run_discarding_stdout(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<CommandOutput, CommandError> {
        run_system(program, args, stdin, Stdio::null())
    }
}

fn run_system(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    stdout: Stdio,
) -> Result<CommandOutput, CommandError> {
    let spawn_err = |source| CommandError::Spawn {
        program: program.to_string(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes the pipe; its exit status tells why.
        let _ = pipe.write_all(data);
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    Ok(CommandOutput {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedCall {
    pub program: String,
    pub args: Vec<String>,
    pub stdin: Option<String>,
}

type Responder = Box<dyn Fn(&RecordedCall) -> CommandOutput + Send + Sync>;

/// A fake runner that records calls and answers with a programmable responder.
#[derive(Clone)]
pub struct RecordingRunner {
    calls: Arc<Mutex<Vec<RecordedCall>>>,
    responder: Arc<Responder>,
}

impl Default for RecordingRunner {
    fn default() -> Self {
        Self::new(|_| CommandOutput::default())
    }
}

impl RecordingRunner {
    pub fn new(responder: impl Fn(&RecordedCall) -> CommandOutput + Send + Sync + 'static) -> Self {
        RecordingRunner {
            calls: Arc::default(),
            responder: Arc::new(Box::new(responder)),
        }
    }

    pub fn calls(&self) -> Vec<RecordedCall> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn clear(&self) {
        if let Ok(mut c) = self.calls.lock() {
            c.clear();
        }
    }

    /// The stdin of every recorded `program args…` call, in order (one per transaction).
    pub fn inputs(&self, program: &str, args: &[&str]) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.program == program && c.args == args)
            .filter_map(|c| c.stdin)
            .collect()
    }

    /// [`RecordingRunner::inputs`] joined, then forgets every call.
    pub fn take_input(&self, program: &str, args: &[&str]) -> String {
        let text = self.inputs(program, args).concat();
        self.clear();
        text
    }
}

impl CommandRunner for RecordingRunner {
    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<CommandOutput, CommandError> {
        let call = RecordedCall {
            program: program.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            stdin: stdin.map(|s| String::from_utf8_lossy(s).into_owned()),
        };
        let out = (self.responder)(&call);
        if let Ok(mut c) = self.calls.lock() {
            c.push(call);
        }
        Ok(out)
    }
}
