//! The per-attempt sandbox: namespaces, a per-attempt UID, a cgroup with limits and a device gate.
//! (Being built: see the tenant-isolation issue.)

pub mod cgroup;
