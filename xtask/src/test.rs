//! `cargo xtask test [-- <cargo test args>]`: the kernel tests, as root.
//!
//! Checks for root, runs `setup`, builds the workspace's default members' binaries (the
//! integration tests start the agent binary), then runs `cargo test` over the default
//! members with the extra arguments, and exits with `cargo test`'s status. Without extra
//! arguments (the whole suite) it first runs every fuzz target (the attribution parsers, the
//! collector's ingest path and config file, the agent's config file) for a few seconds each,
//! and after `cargo test` the kernel suites in a VM on each kernel of the matrix ([`vm`]).
//!
//! The eBPF crate is left out of both on purpose: it is not a default member, builds only
//! for the bpf target, and reaches the agent through its build script.

use std::{
    env,
    ffi::OsString,
    os::unix::process::ExitStatusExt as _,
    process::{Command, ExitCode, ExitStatus},
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, fuzz, setup, vm};

#[derive(clap::Args)]
pub struct Args {
    /// Arguments for `cargo test`, after `--`: package selection, test-name filters, and,
    /// after a second `--`, the test harness's own flags (`-- --nocapture`).
    #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
    cargo_test_args: Vec<OsString>,
}

/// `cargo <subcommand>` in the workspace root, with the bpf-linker setup vouched for first on
/// PATH (aya-build runs `bpf-linker` from PATH).
pub(crate) fn cargo_command(report: &setup::Report, subcommand: &str) -> Command {
    let mut c = Command::new(cmd::cargo());
    c.arg(subcommand).current_dir(cmd::workspace_root());
    if let Some(dir) = report.bpf_linker.parent()
        && cmd::find_on_path("bpf-linker").as_ref() != Some(&report.bpf_linker)
    {
        let path = env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(dir.to_owned()).chain(env::split_paths(&path));
        if let Ok(joined) = env::join_paths(dirs) {
            c.env("PATH", joined);
        }
    }
    c
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if !cmd::is_root()? {
        bail!("kernel tests load BPF programs and create network namespaces: run as root");
    }
    let report = setup::run()?;

    let cargo = |subcommand: &str| cargo_command(&report, subcommand);

    let mut build = cargo("build");
    build
        .arg("--bins")
        .args(profile_args(&args.cargo_test_args));
    println!("xtask: {}", cmd::display(&build));
    cmd::run(&mut build).context("building the binaries the integration tests start")?;

    // The whole suite (no filter): the untrusted-input parsers under libFuzzer too, briefly
    // (first, so that the test results close the output).
    if args.cargo_test_args.is_empty() {
        fuzz::run_targets(&fuzz::TARGETS, FUZZ_SECONDS)?;
    }

    let mut test = cargo("test");
    test.args(&args.cargo_test_args);
    println!("xtask: {}", cmd::display(&test));
    let status = cmd::status(&mut test)?;
    // The whole suite: then the kernel suites again, on each kernel of the VM matrix (after the
    // host's tests, never beside them: both are timing-bound and the machine has 2 cores).
    if args.cargo_test_args.is_empty() {
        let vms_ok = vm::matrix(&report, &[], None)?;
        if status.success() && !vms_ok {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(exit_code(status))
}

/// Seconds each fuzz target runs in `cargo xtask test` (`cargo xtask fuzz` runs longer).
const FUZZ_SECONDS: u32 = 15;

/// The build-profile flags among `cargo test`'s own arguments (before any `--`), so the
/// binaries are built with the profile the tests are built with.
fn profile_args(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = args.iter().take_while(|a| *a != "--");
    while let Some(arg) = args.next() {
        let s = arg.to_string_lossy();
        if s == "--release" || s == "-r" || s.starts_with("--profile=") {
            out.push(arg.clone());
        } else if s == "--profile" {
            out.push(arg.clone());
            out.extend(args.next().cloned());
        }
    }
    out
}

/// `cargo test`'s exit status as ours; a signal becomes 128 + its number, as in a shell.
fn exit_code(status: ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsStr::new).map(OsStr::to_owned).collect()
    }

    #[test]
    fn profile_flags_before_the_harness_separator_are_forwarded() {
        assert_eq!(
            profile_args(&os(&["-p", "agent", "--release", "x", "--", "--release"])),
            os(&["--release"])
        );
        assert_eq!(
            profile_args(&os(&["--profile", "bench", "--profile=dev"])),
            os(&["--profile", "bench", "--profile=dev"])
        );
        assert!(profile_args(&os(&["--", "--nocapture"])).is_empty());
    }

    #[test]
    fn extra_args_after_the_separator_pass_through_verbatim() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let cli = Cli::parse_from(["xtask", "--", "-p", "x", "filter", "--", "--nocapture"]);
        assert_eq!(
            cli.args.cargo_test_args,
            os(&["-p", "x", "filter", "--", "--nocapture"])
        );
        assert!(Cli::parse_from(["xtask"]).args.cargo_test_args.is_empty());
    }
}
