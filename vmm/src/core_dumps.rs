//! Keeping the VM's secrets out of core dumps. `cryptvm run` holds LUKS key schedules
//! and the guest's plaintext RAM, so the process is made non-dumpable before it reads
//! a secret (no core file, and other users' debuggers cannot attach); on top, guest RAM
//! ([`crate::vstate::memory`]) and the key schedules (the block crate's guarded pages)
//! are marked `MADV_DONTDUMP`, for when dumping is enabled again (a debugger as root).

/// Makes this process non-dumpable (`PR_SET_DUMPABLE` 0).
pub fn forbid() -> std::io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes one integer argument and touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether this process may be dumped (`PR_GET_DUMPABLE`).
pub fn allowed() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no argument and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 1 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_becomes_non_dumpable() {
        // (This test process stays non-dumpable; nothing else here needs dumps.)
        super::forbid().expect("prctl");
        assert!(!super::allowed());
    }
}
