//! `cargo xtask fuzz [--seconds N] [TARGET ...]`: the parsers of untrusted bytes under
//! libFuzzer.
//!
//! The PROXY, HTTP head and forwarding-header parsers and the per-turn resolver read bytes that
//! anyone who can connect to an inference host chooses (targets in `attribution/fuzz/`); the
//! collector decodes, validates, folds and stores what any agent sends, reads what other
//! cluster nodes put in JetStream and its key-value buckets, reads its config file and replays
//! its store's journal (targets in `collector/fuzz/`); the agent reads its
//! own config file (target in `agent-config/fuzz/`). Each is a cargo-fuzz project outside the
//! workspace (nightly, libFuzzer's coverage instrumentation). This installs cargo-fuzz if
//! missing and runs each target for a bounded time with a fixed seed, from the checked-in seeds
//! in `<project>/seeds/<target>/` if there are any; `cargo xtask test` runs it too, briefly. A
//! crash (a panic, an overflow, a failed assertion) fails the command and leaves the input in
//! `<project>/artifacts/<target>/`; a crash found becomes a regression test beside the code it
//! broke.
//!
//! The targets are built without a sanitizer (`--sanitizer none`, where cargo-fuzz's default is
//! AddressSanitizer): the three crates they reach forbid `unsafe` code (`#![forbid(unsafe_code)]`
//! in each), so ASan has nothing of ours to check, and without it the collector's project builds
//! in 396 s instead of 564 s here and its ingest target runs 4.4 times as many inputs a second
//! (104,601 against 24,014). The three projects share one target directory (`fuzz/` in the
//! workspace's target directory), so libFuzzer and the dependencies they have in common are
//! built once.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Every fuzz target, with the cargo-fuzz project it is in.
const PROJECTS: [(&str, &str); 11] = [
    ("proxy", "attribution/fuzz"),
    ("http", "attribution/fuzz"),
    ("forwarded", "attribution/fuzz"),
    ("turn", "attribution/fuzz"),
    ("ingest", "collector/fuzz"),
    ("part", "collector/fuzz"),
    ("summary", "collector/fuzz"),
    ("kv", "collector/fuzz"),
    ("config", "collector/fuzz"),
    ("journal", "collector/fuzz"),
    ("agent-config", "agent-config/fuzz"),
];
/// Every fuzz target.
pub const TARGETS: [&str; 11] = [
    "proxy",
    "http",
    "forwarded",
    "turn",
    "ingest",
    "part",
    "summary",
    "kv",
    "config",
    "journal",
    "agent-config",
];
/// cargo-fuzz release installed when missing (0.13 builds with the stable toolchain here).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(clap::Args)]
pub struct Args {
    /// How long each target runs
    #[arg(long, default_value_t = 60)]
    seconds: u32,
    /// Targets to run [default: all: proxy, http, forwarded, turn, ingest, part, summary, kv, config, journal, agent-config]
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    run_targets(&targets, args.seconds)
}

/// Runs `targets` for `seconds` each; an error names the first target that found a crash.
pub fn run_targets(targets: &[&str], seconds: u32) -> Result<()> {
    ensure_cargo_fuzz()?;
    for t in targets {
        let Some((_, project)) = PROJECTS.iter().find(|(name, _)| name == t) else {
            bail!("no fuzz target `{t}`");
        };
        let dir = cmd::workspace_root().join(project);
        let mut c = nightly_cargo();
        c.current_dir(&dir)
            .args(["fuzz", "run", "--sanitizer", "none", "--target-dir"])
            .arg(cmd::target_dir().join("fuzz"))
            .arg(t);
        let seeds = dir.join("seeds").join(t);
        if seeds.is_dir() {
            // New inputs go to the first directory (not checked in); the seeds are read only.
            let corpus = dir.join("corpus").join(t);
            std::fs::create_dir_all(&corpus)
                .with_context(|| format!("creating {}", corpus.display()))?;
            c.arg(&corpus).arg(&seeds);
        }
        c.args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-seed=1",
            "-print_final_stats=1",
        ]);
        println!("xtask: {}", cmd::display(&c));
        let st = cmd::status(&mut c)?;
        if !st.success() {
            bail!(
                "fuzz target `{t}` failed ({st}): the crashing input is in {}",
                dir.join("artifacts").join(t).display()
            );
        }
    }
    Ok(())
}

/// `cargo` of the nightly toolchain (cargo-fuzz needs `-Z` flags).
fn nightly_cargo() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo"]);
    c
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = cmd::output(nightly_cargo().args(["fuzz", "--version"])).is_ok();
    if installed {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)...");
    let mut c = Command::new(cmd::cargo());
    c.args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]);
    cmd::run(&mut c).context("installing cargo-fuzz from crates.io")
}
