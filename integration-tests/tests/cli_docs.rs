//! Shell completions and man pages are generated from the clap definitions: every command is in them, and the
//! scripts parse in their shells (zsh and fish are checked where they are installed; scripts/setup installs them).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use integration_tests::cli;

/// Every visible subcommand, from `qmpbak --help`.
fn subcommands() -> Vec<String> {
    let help = cli::run(&["--help"]).success().stdout;
    let list = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap();
    let names: Vec<String> = list
        .lines()
        // A command's line is indented by two; its wrapped description by more.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| *w != "help")
        .map(str::to_owned)
        .collect();
    assert!(names.iter().any(|n| n == "backup"), "{help}");
    assert!(names.iter().any(|n| n == "completions"), "{help}");
    assert!(!names.iter().any(|n| n == "man"), "man is hidden: {help}");
    names
}

/// Checks a script's syntax with `shell check_flag FILE`, when the shell is installed.
fn parses_in(shell: &str, check_flag: &str, script: &str) {
    if Command::new(shell).arg("--version").output().is_err() {
        eprintln!("{shell} is not installed: its completion script's syntax is not checked");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("completion");
    std::fs::write(&file, script).unwrap();
    let out = Command::new(shell).arg(check_flag).arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "{shell} {check_flag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn completions_for_bash_zsh_and_fish_name_every_command_and_parse() {
    let commands = subcommands();
    for (shell, check_flag) in [("bash", "-n"), ("zsh", "-n"), ("fish", "--no-execute")] {
        let script = cli::run(&["completions", shell]).success().stdout;
        for name in &commands {
            assert!(script.contains(name.as_str()), "{shell} completion lacks {name}");
        }
        assert!(
            script.contains("keep-daily"),
            "{shell} completion lacks the options"
        );
        parses_in(shell, check_flag, &script);
    }
    let bad = cli::run(&["completions", "tcsh"]);
    assert_eq!(bad.code(), Some(2), "{bad:?}");
}

#[test]
fn man_pages_are_written_for_qmpbak_and_each_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man");
    cli::run(&["man", out.to_str().unwrap()]).success();
    let main = std::fs::read_to_string(out.join("qmpbak.1")).unwrap();
    assert!(main.starts_with(".ie") || main.contains(".TH qmpbak 1"), "{main}");
    for name in subcommands() {
        let page = std::fs::read_to_string(out.join(format!("qmpbak-{name}.1")))
            .unwrap_or_else(|e| panic!("no man page for {name}: {e}"));
        assert!(page.contains(&format!(".TH qmpbak-{name} 1")), "{page}");
        assert!(main.contains(&name), "qmpbak.1 does not list {name}");
    }
    assert!(
        !out.join("qmpbak-man.1").exists(),
        "the hidden man command has no page"
    );
}
