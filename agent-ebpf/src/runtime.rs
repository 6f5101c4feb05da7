//! What every object built from this crate needs besides its programs: the license the kernel
//! checks (GPL helpers are used) and, in the kernel build, a panic handler.

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
