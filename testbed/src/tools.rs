//! Checkers and peers the tests run that are not Rust: the tools venv (helm-python-sdk,
//! kubernetes-validate, an OTLP receiver's grpcio and opentelemetry-proto) and Debian's
//! promtool. Missing ones fail the test, naming `cargo xtask setup`; nothing skips.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Environment variable that overrides where the tools venv is.
pub const TOOLS_VENV_ENV: &str = "OUTFLOW_TOOLS_VENV";

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testbed crate is inside the workspace")
        .to_path_buf()
}

/// The tools venv: `$OUTFLOW_TOOLS_VENV`, else `~/.cache/outflow/tools/venv`.
pub fn tools_venv() -> PathBuf {
    if let Some(dir) = std::env::var_os(TOOLS_VENV_ENV) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/outflow/tools/venv")
}

/// The venv's python, with the Python modules `modules` importable; panics naming
/// `cargo xtask setup` otherwise.
pub fn venv_python(modules: &[&str]) -> PathBuf {
    let python = tools_venv().join("bin/python");
    assert!(
        python.is_file(),
        "no tools venv at {} (helm-python-sdk, kubernetes-validate, grpcio, \
         opentelemetry-proto): run `cargo xtask setup`, or set {TOOLS_VENV_ENV}",
        tools_venv().display()
    );
    for module in modules {
        let out = Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
        assert!(
            out.status.success(),
            "the tools venv {} cannot import {module}: run `cargo xtask setup`\n{}",
            tools_venv().display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    python
}

/// Path of a program on `PATH`; panics naming `cargo xtask setup` and the Debian package that
/// has it otherwise.
pub fn program(name: &str, debian_package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: `cargo xtask setup` installs it (Debian package \
                 {debian_package})"
            )
        })
}

/// Runs `command`; panics with its output unless it exits 0.
pub fn run_ok(what: &str, command: &mut Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `promtool check metrics` on `text` (a `/metrics` page); panics with promtool's verdict
/// and the page unless it passes.
pub fn promtool_check(text: &str) {
    let promtool = program("promtool", "prometheus");
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    assert!(
        out.status.success(),
        "promtool check metrics refused the metrics ({}):\n{}{}\n--- metrics:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}
