//! Progress on a terminal: a bar per disk (bytes, rate, ETA) and phase lines; nothing animated when stderr is
//! not a terminal or the output is JSON.

use std::collections::HashMap;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use qmpbak_engine::progress::Progress;

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

/// A bar with qmpbak's style: label, bar, bytes, rate, ETA.
fn new_bar(multi: &MultiProgress, label: &str, total: u64) -> ProgressBar {
    let bar = multi.add(ProgressBar::new(total));
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_owned());
    bar
}

/// The key and label of the bar for all disks together.
const OVERALL: &str = "all disks";

impl Progress for Bars {
    /// Always shown, above the bars when there are any, even where phase lines are not.
    fn warning(&self, message: &str) {
        let line = format!("qmpbak: warning: {message}");
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(&line);
            }
            None => errln!("{line}"),
        }
    }

    fn phase(&self, message: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(message);
            }
            None if !self.quiet => errln!("{message}"),
            None => {}
        }
    }

    fn advance(&self, disk: &str, done: u64, total: u64) {
        let Some(multi) = &self.multi else { return };
        let Ok(mut bars) = self.per_disk.lock() else {
            return;
        };
        let bar = bars
            .entry(disk.to_owned())
            .or_insert_with(|| new_bar(multi, disk, total));
        bar.set_length(total);
        bar.set_position(done);
        // With more than one disk, a bar for all of them together.
        let disks = bars.iter().filter(|(name, _)| name.as_str() != OVERALL);
        let (count, done, total) = disks.fold((0, 0, 0), |(n, d, t), (_, b)| {
            (n + 1, d + b.position(), t + b.length().unwrap_or(0))
        });
        if count > 1 {
            let all = bars
                .entry(OVERALL.to_owned())
                .or_insert_with(|| new_bar(multi, OVERALL, total));
            all.set_length(total);
            all.set_position(done);
        }
    }

    fn finish_disk(&self, disk: &str) {
        if let Ok(bars) = self.per_disk.lock() {
            if let Some(bar) = bars.get(disk) {
                bar.finish();
            }
        }
    }
}
