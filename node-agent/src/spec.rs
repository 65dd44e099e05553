//! `/spec/`: the node's machine info, served by the agent itself because kubelets dropped the
//! route in 1.21 while monitoring agents still ask for it. Field names are cAdvisor's
//! `MachineInfo`; only what /proc and /sys tell cheaply is filled in.

use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize, PartialEq)]
pub struct MachineInfo {
    pub num_cores: usize,
    pub cpu_frequency_khz: u64,
    pub memory_capacity: u64,
    pub machine_id: String,
    pub system_uuid: String,
    pub boot_id: String,
    pub filesystems: Vec<FsInfo>,
    pub network_devices: Vec<NetInfo>,
    pub cloud_provider: &'static str,
    pub instance_type: &'static str,
    pub instance_id: &'static str,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct FsInfo {
    pub device: String,
    pub capacity: u64,
    #[serde(rename = "type")]
    pub fs_type: &'static str,
    pub inodes: u64,
    pub has_inodes: bool,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct NetInfo {
    pub name: String,
    pub mac_address: String,
    pub speed: i64,
    pub mtu: i64,
}

/// Where the machine's files are (the root, so tests can point at a fake tree).
#[derive(Debug, Clone)]
pub struct Roots {
    pub proc: PathBuf,
    pub sys: PathBuf,
    pub etc: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            proc: "/proc".into(),
            sys: "/sys".into(),
            etc: "/etc".into(),
        }
    }
}

fn read_trim(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Number of logical CPUs in a /proc/cpuinfo text.
pub fn parse_num_cores(cpuinfo: &str) -> usize {
    cpuinfo
        .lines()
        .filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor"))
        .count()
}

/// `MemTotal` of a /proc/meminfo text, in bytes.
pub fn parse_mem_total(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Block-device filesystems of a /proc/mounts text (device, mount point), first mount of each
/// device only.
pub fn parse_mounts(mounts: &str) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(device), Some(mount)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !device.starts_with("/dev/") || seen.iter().any(|d| d == device) {
            continue;
        }
        seen.push(device.to_string());
        out.push((device.to_string(), mount.replace("\\040", " ")));
    }
    out
}

/// Reads the machine info of the node the agent runs on.
pub fn machine_info(roots: &Roots) -> MachineInfo {
    let cpuinfo = read_trim(&roots.proc.join("cpuinfo"));
    let cpu_frequency_khz = read_trim(
        &roots
            .sys
            .join("devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"),
    )
    .parse()
    .unwrap_or(0);
    let filesystems = parse_mounts(&read_trim(&roots.proc.join("mounts")))
        .into_iter()
        .filter_map(|(device, mount)| {
            let st = nix::sys::statvfs::statvfs(mount.as_str()).ok()?;
            Some(FsInfo {
                device,
                capacity: st.blocks() as u64 * st.fragment_size() as u64,
                fs_type: "vfs",
                inodes: st.files() as u64,
                has_inodes: true,
            })
        })
        .collect();
    let mut network_devices = Vec::new();
    if let Ok(entries) = std::fs::read_dir(roots.sys.join("class/net")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let dir = entry.path();
            // Like cAdvisor: only devices backed by hardware (a `device` link), not bridges or veths.
            if !dir.join("device").exists() {
                continue;
            }
            network_devices.push(NetInfo {
                mac_address: read_trim(&dir.join("address")),
                speed: read_trim(&dir.join("speed")).parse().unwrap_or(0),
                mtu: read_trim(&dir.join("mtu")).parse().unwrap_or(0),
                name,
            });
        }
    }
    network_devices.sort_by(|a, b| a.name.cmp(&b.name));
    MachineInfo {
        num_cores: parse_num_cores(&cpuinfo),
        cpu_frequency_khz,
        memory_capacity: parse_mem_total(&read_trim(&roots.proc.join("meminfo"))),
        machine_id: read_trim(&roots.etc.join("machine-id")),
        system_uuid: read_trim(&roots.sys.join("class/dmi/id/product_uuid")),
        boot_id: read_trim(&roots.proc.join("sys/kernel/random/boot_id")),
        filesystems,
        network_devices,
        cloud_provider: "Unknown",
        instance_type: "Unknown",
        instance_id: "None",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_texts() {
        assert_eq!(
            parse_num_cores("processor\t: 0\nmodel\t: x\n\nprocessor\t: 1\n"),
            2
        );
        assert_eq!(
            parse_mem_total("MemTotal:        8162916 kB\nMemFree: 1 kB\n"),
            8162916 * 1024
        );
        assert_eq!(parse_mem_total("garbage"), 0);
        let mounts = "proc /proc proc rw 0 0\n/dev/sda1 / ext4 rw 0 0\n/dev/sda1 /var/lib ext4 rw 0 0\n/dev/sdb /my\\040disk xfs rw 0 0\n";
        assert_eq!(
            parse_mounts(mounts),
            vec![
                ("/dev/sda1".into(), "/".into()),
                ("/dev/sdb".into(), "/my disk".into())
            ]
        );
    }

    #[test]
    fn this_machine_has_cores_memory_and_boot_id() {
        let info = machine_info(&Roots::default());
        assert!(info.num_cores >= 1);
        assert!(info.memory_capacity > 0);
        assert_eq!(info.boot_id.len(), 36, "{}", info.boot_id);
        let json = serde_json::to_value(&info).unwrap();
        for key in [
            "num_cores",
            "memory_capacity",
            "machine_id",
            "boot_id",
            "filesystems",
            "network_devices",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }
}
