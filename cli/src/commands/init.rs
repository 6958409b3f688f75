//! `qmpbak init REPO`: create a new, empty repository.

use std::path::PathBuf;

use anyhow::Result;

use super::policy::KeepArgs;
use qmpbak_engine::repo_reports::InitReport;

#[derive(clap::Args)]
pub struct Args {
    /// Directory of the new repository (created; must not exist or be empty).
    repo: PathBuf,
    /// A default retention, applied by `qmpbak prune` when it is given no --keep options (see `qmpbak policy`).
    #[command(flatten)]
    keep: KeepArgs,
    /// Encrypt the repository: every backup file is a LUKS-encrypted qcow2 and every checking table keyed, with
    /// the key given by --key-file, --key-fd, --key-env or QMPBAK_KEY (use 32 random bytes, e.g.
    /// `head -c 32 /dev/urandom > key`: the key is not stretched, so a short passphrase would be weak). Keep
    /// the key safe: without it nothing in the repository can be restored.
    #[arg(long)]
    encrypt: bool,
    #[command(flatten)]
    key: super::args::KeyArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: &Args) -> Result<()> {
    if !args.encrypt && (args.key.file.is_some() || args.key.fd.is_some() || args.key.env.is_some()) {
        anyhow::bail!(qmpbak_engine::exit::Exit::usage(
            "a key was given without --encrypt: pass --encrypt to make an encrypted repository"
        ));
    }
    let key = if args.encrypt {
        let Some(source) = args.key.source() else {
            anyhow::bail!(qmpbak_engine::exit::Exit::usage(
                "--encrypt needs the key: --key-file FILE, --key-fd N, --key-env NAME or QMPBAK_KEY"
            ));
        };
        Some(source.read()?)
    } else {
        None
    };
    let plain = chain::Settings {
        retention: args.keep.checked_policy()?,
        ..chain::Settings::default()
    };
    let settings = match &key {
        Some(key) => plain.encrypted(chain::Encryption::new(key)?),
        None => plain,
    };
    let repo = chain::Repository::init_with(&args.repo, settings)?;
    if let Some(key) = &key {
        let made = match qmpbak_engine::crypt::unlock::unlock_with(&repo, key) {
            Ok(_key) => {
                qmpbak_engine::crypt::unlock::create_template(
                    &qmpbak_engine::qemu_bins::QemuBins::from_env(),
                    repo.path(),
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = made {
            // Not a repository yet: without its template nothing could be backed up into it.
            let _ = std::fs::remove_file(repo.path().join(chain::repo::SETTINGS_FILE));
            return Err(e.context("initialising the encrypted repository"));
        }
    }
    let settings = repo.settings();
    if args.json {
        outln!(
            "{}",
            serde_json::to_value(InitReport {
                repo: repo.path().to_path_buf(),
                block_size: settings.block_size,
                full_every: settings.full_every,
                retention: settings.retention,
                encrypted: settings.encryption.is_some(),
            })?
        )?;
    } else {
        outln!(
            "initialised {}repository {} (checking-table block size {} KiB, a new full every {} backups)",
            if settings.encryption.is_some() {
                "encrypted "
            } else {
                ""
            },
            repo.path().display(),
            settings.block_size / 1024,
            settings.full_every
        )?;
        if let Some(policy) = settings.retention {
            outln!("default retention: {policy}")?;
        }
    }
    Ok(())
}
