//! A seccomp filter for jobs: no new user namespaces. In one, an unprivileged process holds every
//! capability over the namespaces it makes, which opens the kernel's largest attack surface
//! (nf_tables and the like) to a hostile tenant on a shared node. `clone3` answers `ENOSYS` (its
//! flags sit in memory a classic BPF filter cannot read); the C library then falls back to `clone`,
//! whose flags it can.

use nix::errno::Errno;
use nix::libc;

/// `BPF_LD | BPF_W | BPF_ABS`: load a 32-bit word of `struct seccomp_data`.
const LOAD: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
const JUMP_EQ: u16 = 0x15;
/// `BPF_JMP | BPF_JSET | BPF_K`.
const JUMP_SET: u16 = 0x45;
/// `BPF_RET | BPF_K`.
const RETURN: u16 = 0x06;
/// Offsets in `struct seccomp_data`: the syscall number, the audit architecture, and the low
/// 32 bits of the first argument (little-endian).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LOW: u32 = 16;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
/// x32 system calls arrive with x86-64's audit architecture and this bit in their number: they
/// are all refused (else `0x40000000 | unshare` would pass on a kernel with x32 enabled).
/// aarch64 has no such bit.
#[cfg(target_arch = "x86_64")]
const X32_BIT: u32 = 0x4000_0000;
#[cfg(target_arch = "aarch64")]
const X32_BIT: u32 = 0;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter: another architecture's calls, and everything but `unshare`/`clone` with
/// `CLONE_NEWUSER` and `clone3`, pass.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn program() -> Vec<libc::sock_filter> {
    let newuser = libc::CLONE_NEWUSER as u32;
    vec![
        op(LOAD, 0, 0, ARCH),                                            // 0
        op(JUMP_EQ, 0, 7, AUDIT_ARCH),                                   // 1: else allow (9)
        op(LOAD, 0, 0, NR),                                              // 2
        op(JUMP_SET, 6, 0, X32_BIT),                                     // 3: eperm (10)
        op(JUMP_EQ, 6, 0, libc::SYS_clone3 as u32),                      // 4: enosys (11)
        op(JUMP_EQ, 1, 0, libc::SYS_unshare as u32),                     // 5: check (7)
        op(JUMP_EQ, 0, 2, libc::SYS_clone as u32),                       // 6: else allow (9)
        op(LOAD, 0, 0, ARG0_LOW),                                        // 7
        op(JUMP_SET, 1, 0, newuser),                                     // 8: eperm (10)
        op(RETURN, 0, 0, libc::SECCOMP_RET_ALLOW),                       // 9
        op(RETURN, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),  // 10
        op(RETURN, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32), // 11
    ]
}

/// Installs the filter on this process (and so on everything it then runs). Needs
/// `no_new_privs` (set before).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn refuse_user_namespaces() -> Result<(), Errno> {
    let mut filter = program();
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
    // SAFETY: prctl reads `prog` (and the filter it points to), both alive for the call.
    let rc = unsafe {
        libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER as libc::c_ulong, &prog as *const _, 0, 0)
    };
    Errno::result(rc).map(drop)
}

/// No filter where its syscall numbers are not written down here.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn refuse_user_namespaces() -> Result<(), Errno> {
    Ok(())
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;

    /// Runs the classic BPF program on one call, as the kernel would: (nr, arch, first argument).
    fn verdict(nr: u32, arch: u32, arg0: u32) -> u32 {
        let prog = program();
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                LOAD => acc = [nr, arch, 0, 0, arg0][i.k as usize / 4],
                JUMP_EQ | JUMP_SET => {
                    let taken = if i.code == JUMP_EQ { acc == i.k } else { acc & i.k != 0 };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                RETURN => return i.k,
                other => panic!("unknown instruction {other:#x}"),
            }
        }
    }

    #[test]
    fn user_namespaces_are_refused_and_everything_else_passes() {
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let newuser = libc::CLONE_NEWUSER as u32;
        let (unshare, clone) = (libc::SYS_unshare as u32, libc::SYS_clone as u32);
        assert_eq!(verdict(unshare, AUDIT_ARCH, newuser), eperm);
        assert_eq!(verdict(clone, AUDIT_ARCH, newuser | libc::SIGCHLD as u32), eperm);
        assert_eq!(verdict(libc::SYS_clone3 as u32, AUDIT_ARCH, 0), libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
        assert_eq!(verdict(unshare, AUDIT_ARCH, libc::CLONE_NEWNS as u32), libc::SECCOMP_RET_ALLOW);
        assert_eq!(verdict(clone, AUDIT_ARCH, libc::SIGCHLD as u32), libc::SECCOMP_RET_ALLOW);
        assert_eq!(verdict(libc::SYS_read as u32, AUDIT_ARCH, 0), libc::SECCOMP_RET_ALLOW);
        if X32_BIT != 0 {
            assert_eq!(verdict(X32_BIT | unshare, AUDIT_ARCH, newuser), eperm, "x32 unshare");
            assert_eq!(verdict(X32_BIT | libc::SYS_read as u32, AUDIT_ARCH, 0), eperm, "x32 at all");
        }
    }
}
