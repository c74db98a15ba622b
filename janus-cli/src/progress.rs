//! Progress on stderr: a bar when stderr is a terminal, plain lines otherwise, nothing when quiet.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use janus_core::hub::HubEvent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Bar,
    Lines,
    Quiet,
}

/// Reports the stages of a command.
pub struct Progress {
    mode: Mode,
    bar: Option<ProgressBar>,
    /// Last tenth of a counted stage printed as a plain line.
    last_tenth: Option<u64>,
}

impl Progress {
    /// A reporter for this process's stderr.
    pub fn new(quiet: bool) -> Self {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines
        };
        Progress {
            mode,
            bar: None,
            last_tenth: None,
        }
    }

    /// A stage without a count (loading, decoding): a spinner or one line.
    pub fn stage(&mut self, message: &str) {
        self.clear();
        match self.mode {
            Mode::Quiet => {}
            Mode::Lines => line(message),
            Mode::Bar => {
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
                    bar.set_style(style);
                }
                bar.set_message(message.to_string());
                bar.enable_steady_tick(Duration::from_millis(120));
                self.bar = Some(bar);
            }
        }
    }

    /// A counted stage: `done` of `total` (a bar, or a line every tenth).
    pub fn count(&mut self, message: &str, done: u64, total: u64, bytes: bool) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Lines => {
                let tenth = (done * 10).checked_div(total).unwrap_or(0);
                if self.last_tenth != Some(tenth) {
                    self.last_tenth = Some(tenth);
                    if bytes {
                        line(&format!(
                            "{message}: {} of {}",
                            indicatif::HumanBytes(done),
                            indicatif::HumanBytes(total)
                        ));
                    } else {
                        line(&format!("{message}: {done}/{total}"));
                    }
                }
            }
            Mode::Bar => {
                let bar = match &self.bar {
                    Some(bar) if bar.length() == Some(total) => bar.clone(),
                    _ => {
                        self.clear();
                        let bar = ProgressBar::with_draw_target(
                            Some(total),
                            ProgressDrawTarget::stderr(),
                        );
                        let template = if bytes {
                            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}"
                        } else {
                            "{msg} [{bar:30}] {pos}/{len} {elapsed} {eta}"
                        };
                        if let Ok(style) = ProgressStyle::with_template(template) {
                            bar.set_style(style.progress_chars("=> "));
                        }
                        bar.set_message(message.to_string());
                        self.bar = Some(bar.clone());
                        bar
                    }
                };
                bar.set_position(done);
            }
        }
    }

    /// Download events of the hub client.
    pub fn hub(&mut self, event: HubEvent<'_>) {
        match event {
            HubEvent::Listing { repo } => self.stage(&format!("looking up {repo} on the hub")),
            HubEvent::Start { file, size } => {
                self.clear();
                self.count(&format!("downloading {file}"), 0, size, true);
            }
            HubEvent::Progress { file, done, total } => {
                self.count(&format!("downloading {file}"), done, total, true)
            }
            HubEvent::Finish { .. } => self.clear(),
        }
    }

    /// A closing line (kept on screen).
    pub fn done(&mut self, message: &str) {
        self.clear();
        if self.mode != Mode::Quiet {
            line(message);
        }
    }

    /// Removes the bar or spinner.
    pub fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.last_tenth = None;
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

fn line(message: &str) {
    let mut err = std::io::stderr().lock();
    // Progress is best effort: a closed stderr is no reason to fail.
    let _ = writeln!(err, "{message}");
}
