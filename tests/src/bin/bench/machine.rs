//! Machine facts and CPU accounting from /proc.

use std::path::Path;

use serde_json::{Value, json};

pub(crate) fn machine_facts() -> Value {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into())
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    json!({
        "nproc": nproc,
        "cpu_model": field("model name"),
        "cpu_mhz": field("cpu MHz"),
        "kernel": kernel,
        "mem_total_mib": mem_kb / 1024,
        "loadavg_at_start": loadavg(),
        "bench_build": if cfg!(debug_assertions) { "debug (numbers are NOT representative)" } else { "release" },
    })
}

/// CPU time (ns) and run-queue wait (ns) of one task, from its `schedstat`.
pub(crate) fn schedstat(path: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut f = text
        .split_whitespace()
        .map(|x| x.parse::<u64>().unwrap_or(0));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

/// CPU time of the calling thread, ns.
pub(crate) fn thread_cpu_ns() -> u64 {
    schedstat(Path::new("/proc/thread-self/schedstat")).0
}

/// CPU time and run-queue wait (ns) summed over the live threads of `pid` whose name
/// starts with `prefix` (all threads when empty). Threads that exited are not counted;
/// tokio's threads live for the whole measurement.
pub(crate) fn process_cpu(pid: u32, prefix: &str) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .map(|t| schedstat(&t.path().join("schedstat")))
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
}

/// The pid of our child process named `comm` whose command line mentions `arg`.
pub(crate) fn child_pid(comm: &str, arg: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // pid (comm) state ppid ...
        let (head, rest) = stat.rsplit_once(')')?;
        let name = head.split_once('(')?.1;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let mentions = cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes());
        (ppid == me && name == comm && mentions).then_some(pid)
    })
}

/// `/proc/loadavg`'s 1, 5 and 15 minute averages: other work on a shared machine shows here.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
