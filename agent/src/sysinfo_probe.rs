//! Device and agent metrics for telemetry, read with sysinfo.

use std::path::Path;

use edgefleet_shared::protocol::DeviceMetrics;
use sysinfo::{Components, Disks, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// Keeps sysinfo's state between reports (CPU usage is a difference between two
/// readings).
#[derive(Debug)]
pub struct Probe {
    /// None where sysinfo does not support the platform: metrics read as zero.
    system: Option<System>,
    pid: Option<Pid>,
}

impl Default for Probe {
    fn default() -> Self {
        Probe::new()
    }
}

/// Free and total bytes of the filesystem holding `path` (the mount point that is
/// the longest prefix of it), if sysinfo can tell.
pub fn disk_space(path: &Path) -> Option<(u64, u64)> {
    let path = path.canonicalize().ok()?;
    let disks = Disks::new_with_refreshed_list().ok()?;
    disks
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| (d.available_space(), d.total_space()))
}

impl Probe {
    /// A probe with a first CPU reading taken.
    pub fn new() -> Probe {
        let mut system = System::new().ok();
        if let Some(s) = system.as_mut() {
            s.refresh_cpu_usage();
        }
        Probe {
            system,
            pid: sysinfo::get_current_pid().ok(),
        }
    }

    /// CPU, memory, disk (of `data_dir`), temperature and uptime now.
    pub fn device_metrics(&mut self, data_dir: &Path) -> DeviceMetrics {
        let (cpu_percent, mem_used, mem_total) = match self.system.as_mut() {
            Some(s) => {
                s.refresh_cpu_usage();
                s.refresh_memory();
                (s.global_cpu_usage(), s.used_memory(), s.total_memory())
            }
            None => (0.0, 0, 0),
        };
        let (disk_free, disk_total) = disk_space(data_dir).unwrap_or((0, 0));
        // Empty on virtual machines (no hwmon): the field is optional.
        let temperature_c = Components::new_with_refreshed_list().ok().and_then(|c| {
            c.iter()
                .filter_map(|c| c.temperature())
                .filter(|t| t.is_finite())
                .reduce(f32::max)
        });
        DeviceMetrics {
            cpu_percent,
            mem_used,
            mem_total,
            disk_free,
            disk_total,
            temperature_c,
            uptime_s: System::uptime().unwrap_or(0),
        }
    }

    /// The agent's resident memory, bytes.
    pub fn own_rss(&mut self) -> u64 {
        let (Some(pid), Some(system)) = (self.pid, self.system.as_mut()) else {
            return 0;
        };
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            true,
            ProcessRefreshKind::nothing().with_memory(),
        );
        system.process(pid).map_or(0, |p| p.memory())
    }
}
