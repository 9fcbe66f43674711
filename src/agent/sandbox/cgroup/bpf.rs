//! Hand-built cgroup BPF programs, loaded and attached with raw `bpf(2)`: the v2 device gate
//! (`BPF_PROG_TYPE_CGROUP_DEVICE`) and the address block (`BPF_PROG_TYPE_CGROUP_SOCK_ADDR` on
//! connect and UDP send). A few dozen instructions each; no libbpf, no BPF toolchain.
//!
//! Attached with `BPF_PROG_ATTACH` and `BPF_F_ALLOW_MULTI`: the attachment holds the program until
//! the cgroup is removed, and every program on the path from the root must allow an operation.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::libc;

use super::{CgroupError, Device, DeviceRules};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;

const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;

const BPF_F_ALLOW_MULTI: u32 = 2;

/// `bpf_cgroup_dev_ctx`: `access_type` (device type in the low 16 bits), `major`, `minor`.
const DEV_ACCESS_TYPE: i16 = 0;
const DEV_MAJOR: i16 = 4;
const DEV_MINOR: i16 = 8;
const BPF_DEVCG_DEV_BLOCK: i32 = 1;
const BPF_DEVCG_DEV_CHAR: i32 = 2;

/// `bpf_sock_addr`: `user_ip4` and `user_ip6[4]`, in network byte order.
const SOCK_USER_IP4: i16 = 4;
const SOCK_USER_IP6: i16 = 8;

/// One `struct bpf_insn` (registers: destination in the low nibble, source in the high one).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// A small assembler with forward jumps to labels.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    /// (instruction index, label) of each jump to patch.
    jumps: Vec<(usize, usize)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn { code, regs: dst | (src << 4), off, imm });
    }
    /// `dst = *(u32 *)(r1 + off)`: a context field.
    fn load_ctx_u32(&mut self, dst: u8, off: i16) {
        self.op(0x61, dst, 1, off, 0); // BPF_LDX | BPF_MEM | BPF_W
    }
    /// `dst = imm` as an unsigned 32-bit value (a 64-bit immediate load: no sign extension).
    fn load_u32(&mut self, dst: u8, value: u32) {
        self.op(0x18, dst, 0, 0, value as i32); // BPF_LD | BPF_IMM | BPF_DW, low half
        self.op(0, 0, 0, 0, 0); // high half
    }
    fn and_imm(&mut self, dst: u8, imm: i32) {
        self.op(0x57, dst, 0, 0, imm); // BPF_ALU64 | BPF_AND | BPF_K
    }
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn bind(&mut self, label: usize) {
        self.labels[label] = Some(self.insns.len());
    }
    /// `if dst != imm goto label`.
    fn jne_imm(&mut self, dst: u8, imm: i32, label: usize) {
        self.jumps.push((self.insns.len(), label));
        self.op(0x55, dst, 0, 0, imm); // BPF_JMP | BPF_JNE | BPF_K
    }
    /// `if dst == src goto label`.
    fn jeq_reg(&mut self, dst: u8, src: u8, label: usize) {
        self.jumps.push((self.insns.len(), label));
        self.op(0x1d, dst, src, 0, 0); // BPF_JMP | BPF_JEQ | BPF_X
    }
    /// `if dst != src goto label`.
    fn jne_reg(&mut self, dst: u8, src: u8, label: usize) {
        self.jumps.push((self.insns.len(), label));
        self.op(0x5d, dst, src, 0, 0); // BPF_JMP | BPF_JNE | BPF_X
    }
    /// `return value`.
    fn ret(&mut self, value: i32) {
        self.op(0xb7, 0, 0, 0, value); // BPF_ALU64 | BPF_MOV | BPF_K, r0
        self.op(0x95, 0, 0, 0, 0); // BPF_JMP | BPF_EXIT
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, label) in std::mem::take(&mut self.jumps) {
            let target = self.labels[label].expect("every jump label is bound");
            self.insns[at].off = i16::try_from(target as isize - at as isize - 1).expect("program is short");
        }
        self.insns
    }
}

/// The device gate: returns 1 (allow) for the listed devices, 0 (`EPERM`) for every other.
pub(super) fn device_program(rules: &DeviceRules) -> io::Result<Vec<Insn>> {
    let mut asm = Asm::default();
    asm.load_ctx_u32(2, DEV_ACCESS_TYPE);
    asm.and_imm(2, 0xffff);
    asm.load_ctx_u32(3, DEV_MAJOR);
    asm.load_ctx_u32(4, DEV_MINOR);
    for device in &rules.allow {
        let kind = match device.kind {
            'c' => BPF_DEVCG_DEV_CHAR,
            'b' => BPF_DEVCG_DEV_BLOCK,
            other => return Err(invalid(format!("device kind {other:?} is neither 'c' nor 'b'"))),
        };
        let next = asm.label();
        asm.jne_imm(2, kind, next);
        asm.jne_imm(3, number(device.major)?, next);
        if device.minor != Device::ANY_MINOR {
            asm.jne_imm(4, number(device.minor)?, next);
        }
        asm.ret(1);
        asm.bind(next);
    }
    asm.ret(0);
    Ok(asm.finish())
}

/// Refuses IPv4 destinations in `addrs` (0 ⇒ `EPERM`), allows everything else.
pub(super) fn block_v4_program(addrs: &[Ipv4Addr]) -> Vec<Insn> {
    let mut asm = Asm::default();
    let deny = asm.label();
    asm.load_ctx_u32(2, SOCK_USER_IP4);
    for addr in addrs {
        asm.load_u32(3, u32::from_ne_bytes(addr.octets()));
        asm.jeq_reg(2, 3, deny);
    }
    asm.ret(1);
    asm.bind(deny);
    asm.ret(0);
    asm.finish()
}

/// Refuses IPv6 destinations that are `addrs` mapped (`::ffff:a.b.c.d`), allows everything else.
pub(super) fn block_v6_mapped_program(addrs: &[Ipv4Addr]) -> Vec<Insn> {
    let mut asm = Asm::default();
    let (allow, deny) = (asm.label(), asm.label());
    asm.load_ctx_u32(2, SOCK_USER_IP6);
    asm.jne_imm(2, 0, allow);
    asm.load_ctx_u32(2, SOCK_USER_IP6 + 4);
    asm.jne_imm(2, 0, allow);
    asm.load_ctx_u32(2, SOCK_USER_IP6 + 8);
    asm.load_u32(3, u32::from_ne_bytes([0, 0, 0xff, 0xff]));
    asm.jne_reg(2, 3, allow);
    asm.load_ctx_u32(2, SOCK_USER_IP6 + 12);
    for addr in addrs {
        asm.load_u32(3, u32::from_ne_bytes(addr.octets()));
        asm.jeq_reg(2, 3, deny);
    }
    asm.bind(allow);
    asm.ret(1);
    asm.bind(deny);
    asm.ret(0);
    asm.finish()
}

/// Loads the device gate for `rules` and attaches it to the cgroup2 directory `leaf`.
pub(super) fn attach_device_gate(leaf: &Path, rules: &DeviceRules) -> Result<(), CgroupError> {
    let insns = device_program(rules).map_err(|e| CgroupError::new(leaf, e))?;
    load_and_attach(leaf, "hyb_devices", BPF_PROG_TYPE_CGROUP_DEVICE, BPF_CGROUP_DEVICE, &insns, 0)
}

/// Attaches the address block for `addrs` to the connect and UDP-send hooks, IPv4 and IPv6.
pub(super) fn attach_ipv4_block(leaf: &Path, addrs: &[Ipv4Addr]) -> Result<(), CgroupError> {
    if addrs.is_empty() {
        return Ok(());
    }
    let v4 = block_v4_program(addrs);
    let v6 = block_v6_mapped_program(addrs);
    for (name, hook, insns) in [
        ("hyb_connect4", BPF_CGROUP_INET4_CONNECT, &v4),
        ("hyb_sendmsg4", BPF_CGROUP_UDP4_SENDMSG, &v4),
        ("hyb_connect6", BPF_CGROUP_INET6_CONNECT, &v6),
        ("hyb_sendmsg6", BPF_CGROUP_UDP6_SENDMSG, &v6),
    ] {
        load_and_attach(leaf, name, BPF_PROG_TYPE_CGROUP_SOCK_ADDR, hook, insns, hook)?;
    }
    Ok(())
}

fn load_and_attach(
    leaf: &Path,
    name: &str,
    prog_type: u32,
    attach_type: u32,
    insns: &[Insn],
    expected_attach_type: u32,
) -> Result<(), CgroupError> {
    let what = |step: &str, e: io::Error| {
        CgroupError::other(
            leaf,
            e.kind(),
            format!("bpf {step} of the {name} program: {e} (is BPF available to the agent?)"),
        )
    };
    let program = prog_load(name, prog_type, expected_attach_type, insns).map_err(|e| what("BPF_PROG_LOAD", e))?;
    let dir = std::fs::File::open(leaf).map_err(|e| CgroupError::new(leaf, e))?;
    prog_attach(&dir, &program, attach_type).map_err(|e| what("BPF_PROG_ATTACH", e))
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Loads a program. On `EPERM` (kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK) it raises
/// the limit and tries again; on a verifier refusal the error carries the verifier's last words.
fn prog_load(name: &str, prog_type: u32, expected_attach_type: u32, insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: u32::try_from(insns.len()).map_err(|_| invalid("program too long".into()))?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type,
        ..ProgLoadAttr::default()
    };
    for (slot, byte) in attr.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    let mut result = bpf(BPF_PROG_LOAD, &attr);
    if result.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::EPERM)) {
        let infinity = nix::sys::resource::RLIM_INFINITY;
        if nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK, infinity, infinity).is_ok() {
            result = bpf(BPF_PROG_LOAD, &attr);
        }
    }
    if let Err(e) = &result
        && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EACCES))
    {
        let mut log = vec![0u8; 16 * 1024];
        attr.log_level = 1;
        attr.log_size = log.len() as u32;
        attr.log_buf = log.as_mut_ptr() as u64;
        let _ = bpf(BPF_PROG_LOAD, &attr);
        let text = String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(log.len())]).into_owned();
        let tail: String = text.trim().lines().rev().take(3).collect::<Vec<_>>().join(" / ");
        return Err(io::Error::new(e.kind(), format!("{e}; verifier: {tail}")));
    }
    // SAFETY: BPF_PROG_LOAD returned a new file descriptor that nothing else owns.
    result.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn prog_attach(cgroup: &std::fs::File, program: &OwnedFd, attach_type: u32) -> io::Result<()> {
    let attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: program.as_raw_fd() as u32,
        attach_type,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    bpf(BPF_PROG_ATTACH, &attr).map(|_| ())
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<i32> {
    // SAFETY: `attr` is a live, fully initialised `union bpf_attr` prefix of the given size; the
    // pointers inside it point to buffers that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc as i32) }
}

fn number(value: u32) -> io::Result<i32> {
    i32::try_from(value).map_err(|_| invalid(format!("device number {value} is out of range")))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}
