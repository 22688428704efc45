//! The process's own metrics under Prometheus's standard names (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, …), read from `/proc/self` at each scrape. The
//! `prometheus` crate has such a collector behind its `process` feature, which brings the `procfs` crate and
//! its dependencies for five numbers.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, IntGauge};

pub struct Process {
    cpu: Counter,
    resident: IntGauge,
    virtual_memory: IntGauge,
    open_fds: IntGauge,
    max_fds: IntGauge,
    start_time: IntGauge,
    threads: IntGauge,
}

impl Process {
    pub fn new() -> Process {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        Process {
            cpu: Counter::new(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds",
            )
            .expect("valid metric"),
            resident: gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
            ),
            virtual_memory: gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
            ),
            open_fds: gauge("process_open_fds", "Number of open file descriptors"),
            max_fds: gauge("process_max_fds", "Maximum number of open file descriptors"),
            start_time: gauge(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
            ),
            threads: gauge("process_threads", "Number of OS threads in the process"),
        }
    }

    fn all(&self) -> [&dyn Collector; 7] {
        [
            &self.cpu,
            &self.resident,
            &self.virtual_memory,
            &self.open_fds,
            &self.max_fds,
            &self.start_time,
            &self.threads,
        ]
    }

    /// Reads `/proc/self`; a field that cannot be read keeps its last value.
    fn read(&self) {
        if let Some(stat) = Stat::read() {
            // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
            let (ticks, page) = unsafe {
                (
                    libc::sysconf(libc::_SC_CLK_TCK),
                    libc::sysconf(libc::_SC_PAGESIZE),
                )
            };
            if ticks > 0 {
                let cpu = (stat.utime + stat.stime) as f64 / ticks as f64;
                let seen = self.cpu.get();
                if cpu > seen {
                    self.cpu.inc_by(cpu - seen);
                }
                if let Some(boot) = boot_time() {
                    self.start_time
                        .set((boot + stat.starttime / ticks as u64) as i64);
                }
            }
            if page > 0 {
                self.resident.set(stat.rss * page);
            }
            self.virtual_memory.set(stat.vsize as i64);
            self.threads.set(stat.threads);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            self.max_fds.set(limit.rlim_cur as i64);
        }
    }
}

impl Default for Process {
    fn default() -> Self {
        Process::new()
    }
}

impl Collector for Process {
    fn desc(&self) -> Vec<&Desc> {
        self.all().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.read();
        self.all().into_iter().flat_map(|c| c.collect()).collect()
    }
}

/// The fields of `/proc/self/stat` used here (proc(5)).
struct Stat {
    utime: u64,
    stime: u64,
    threads: i64,
    starttime: u64,
    vsize: u64,
    rss: i64,
}

impl Stat {
    fn read() -> Option<Stat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name, in parentheses, may hold spaces: fields are counted after its closing one.
        let fields: Vec<&str> = text.get(text.rfind(')')? + 2..)?.split(' ').collect();
        // `fields[0]` is field 3 of proc(5), the state.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<i64>().ok());
        Some(Stat {
            utime: field(14)? as u64,
            stime: field(15)? as u64,
            threads: field(20)?,
            starttime: field(22)? as u64,
            vsize: field(23)? as u64,
            rss: field(24)?,
        })
    }
}

/// When the machine booted, in seconds since the epoch (`btime` in `/proc/stat`).
fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        use prometheus::Encoder;
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&Process::new().collect(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        };
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_threads") >= 1.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(started > now - 3600.0 && started <= now + 1.0, "{started}");
    }
}
