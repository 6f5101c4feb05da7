//! Rebuild when bpf-linker changes (aya-template's habit): it is the eBPF crate's linker.
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
