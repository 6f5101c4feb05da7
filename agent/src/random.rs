//! Random numbers from the kernel, for the agent id and the spool's epoch.
use std::io;

/// Random bytes from the kernel (`getrandom(2)`, blocking only before the pool is seeded).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most N - filled bytes into buf[filled..].
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // getrandom(2) cannot fail otherwise on Linux >= 3.17; never hand out zeros.
            let fallback = fastrand::u128(..).to_le_bytes();
            for (i, b) in buf[filled..].iter_mut().enumerate() {
                *b = fallback[i % fallback.len()];
            }
            filled = N;
        }
    }
    buf
}

/// A random, non-zero u64.
pub fn random_nonzero_u64() -> u64 {
    loop {
        let v = u64::from_le_bytes(random_bytes());
        if v != 0 {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_u64s_are_nonzero() {
        for _ in 0..100 {
            assert_ne!(random_nonzero_u64(), 0);
        }
    }
}
