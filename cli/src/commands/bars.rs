//! Progress on a terminal: a bar per disk (bytes, rate, ETA) and phase lines; nothing animated when stderr is
//! not a terminal or the output is JSON.

use std::collections::HashMap;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use qmpbak::progress::Progress;

/// Progress bars on a terminal; phase lines only otherwise (nothing animated when not a TTY).
pub struct Bars {
    multi: Option<MultiProgress>,
    per_disk: Mutex<HashMap<String, ProgressBar>>,
    quiet: bool,
}

impl Bars {
    pub fn new(tty: bool) -> Bars {
        Bars {
            multi: tty.then(MultiProgress::new),
            per_disk: Mutex::new(HashMap::new()),
            quiet: !tty,
        }
    }

    pub fn clear(&self) {
        if let Ok(mut bars) = self.per_disk.lock() {
            for (_, bar) in bars.drain() {
                bar.finish_and_clear();
            }
        }
    }
}

impl Progress for Bars {
    fn phase(&self, message: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(message);
            }
            None if !self.quiet => eprintln!("{message}"),
            None => {}
        }
    }

    fn advance(&self, disk: &str, done: u64, total: u64) {
        let Some(multi) = &self.multi else { return };
        let Ok(mut bars) = self.per_disk.lock() else {
            return;
        };
        let bar = bars.entry(disk.to_owned()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(total));
            let style = ProgressStyle::with_template(
                "{prefix:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .map(|s| s.progress_chars("=> "));
            if let Ok(style) = style {
                bar.set_style(style);
            }
            bar.set_prefix(disk.to_owned());
            bar
        });
        bar.set_length(total);
        bar.set_position(done);
    }

    fn finish_disk(&self, disk: &str) {
        if let Ok(bars) = self.per_disk.lock() {
            if let Some(bar) = bars.get(disk) {
                bar.finish();
            }
        }
    }
}
