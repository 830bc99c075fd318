//! Metrics exposition shared by the gateway and the node-redirector: the process's own metrics
//! (`process_*`, the names every Prometheus client library uses), and the Prometheus text format
//! (0.0.4) for scrapers that ask for it rather than OpenMetrics (promtool, agents, older
//! Prometheus servers), chosen by the request's `Accept` header.

use std::fmt::Write as _;

use prometheus_client::registry::Registry;

/// `Content-Type` of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` header asks for OpenMetrics (Prometheus servers do by default);
/// anything else gets the Prometheus text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut fields = part.split(';').map(str::trim);
            let media = fields.next().unwrap_or("");
            let q = fields.find_map(|f| f.strip_prefix("q=")).and_then(|q| q.parse::<f32>().ok()).unwrap_or(1.0);
            media.eq_ignore_ascii_case("application/openmetrics-text") && q > 0.0
        })
    })
}

/// The registries as one exposition: OpenMetrics (`openmetrics`) or the Prometheus text format,
/// and its `Content-Type`.
pub fn render(registries: &[&Registry], openmetrics: bool) -> (String, &'static str) {
    let mut om = String::new();
    for r in registries {
        let mut part = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut part, r);
        om.push_str(part.strip_suffix("# EOF\n").unwrap_or(&part));
    }
    if openmetrics {
        om.push_str("# EOF\n");
        (om, OPENMETRICS)
    } else {
        (to_prometheus_text(&om), PROMETHEUS_TEXT)
    }
}

/// OpenMetrics text (as prometheus-client writes it) in the Prometheus text format: a counter's
/// HELP and TYPE name its `_total` samples, an info metric is a gauge named `_info`, `# UNIT`
/// and `# EOF` go, `_created` samples go.
pub fn to_prometheus_text(om: &str) -> String {
    let mut renamed: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            match rest.split_once(' ') {
                Some((name, "counter")) => {
                    renamed.insert(name, format!("{name}_total"));
                }
                Some((name, "info")) => {
                    renamed.insert(name, format!("{name}_info"));
                }
                _ => {}
            }
        }
    }
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = renamed.get(name).map_or(name, String::as_str);
            let _ = writeln!(out, "# HELP {name} {help}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let new = renamed.get(name).map_or(name, String::as_str);
            let ty = match ty {
                "info" => "gauge",
                "counter" | "gauge" | "histogram" | "summary" => ty,
                _ => "untyped",
            };
            let _ = writeln!(out, "# TYPE {new} {ty}");
        } else {
            let sample = line.split(['{', ' ']).next().unwrap_or("");
            if sample.ends_with("_created") && renamed.contains_key(sample.trim_end_matches("_created")) {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The process's own metrics, read from `/proc/self` at each scrape: `process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`,
/// `process_max_fds`, `process_start_time_seconds`. Register it in a registry without a prefix.
#[derive(Debug)]
pub struct ProcessCollector;

/// Seconds per clock tick of `/proc` (`USER_HZ`) and bytes per page.
fn clock_and_page() -> (f64, u64) {
    // SAFETY: sysconf has no preconditions; it only reads configuration values.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    (if ticks > 0 { 1.0 / ticks as f64 } else { 0.01 }, if page > 0 { page as u64 } else { 4096 })
}

/// What `/proc/self` says now: (cpu seconds, rss bytes, vsize bytes, open fds, max fds, start
/// time in Unix seconds).
fn process_stats() -> Option<(f64, u64, u64, u64, u64, f64)> {
    let (tick, page) = clock_and_page();
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // rest[0] is field 3 (state): utime 14, stime 15, starttime 22, vsize 23, rss 24.
    let cpu = (num(11)? + num(12)?) as f64 * tick;
    let (start_ticks, vsize, rss) = (num(19)?, num(20)?, num(21)?);
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|b| b.trim().parse::<u64>().ok()))?;
    let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0);
    Some((cpu, rss * page, vsize, fds, max_fds, boot as f64 + start_ticks as f64 * tick))
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let Some((cpu, rss, vsize, fds, max_fds, start)) = process_stats() else { return Ok(()) };
        let c = ConstCounter::new(cpu);
        c.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent in seconds",
            None,
            c.metric_type(),
        )?)?;
        for (name, help, v) in [
            ("process_resident_memory_bytes", "Resident memory size in bytes", rss as f64),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes", vsize as f64),
            ("process_open_fds", "Number of open file descriptors", fds as f64),
            ("process_max_fds", "Maximum number of open file descriptors", max_fds as f64),
            ("process_start_time_seconds", "Start time of the process since the Unix epoch in seconds", start),
        ] {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// `<prefix>_build_info{version} 1`: which build runs.
pub fn register_build_info(registry: &mut Registry, version: &'static str) {
    #[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
    struct Build {
        version: &'static str,
    }
    let build =
        prometheus_client::metrics::family::Family::<Build, prometheus_client::metrics::gauge::Gauge>::default();
    build.get_or_create(&Build { version }).set(1);
    registry.register("build_info", "The running build: its version (always 1)", build);
}

/// A registry with the process's metrics (no prefix).
pub fn process_registry() -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(ProcessCollector));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_openmetrics_only_when_asked() {
        assert!(wants_openmetrics(Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
        assert!(!wants_openmetrics(None));
    }

    #[test]
    fn converts_counters_and_info_metrics_to_the_prometheus_text_format() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total{a=\"b\"} 3\nx_requests_created 1.0\n\
                  # HELP x_build Build.\n# TYPE x_build info\nx_build_info{version=\"1\"} 1\n# HELP x_up Up.\n# TYPE x_up gauge\n# UNIT x_up seconds\nx_up 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total{a=\"b\"} 3\n\
             # HELP x_build_info Build.\n# TYPE x_build_info gauge\nx_build_info{version=\"1\"} 1\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
    }

    #[test]
    fn reads_the_process_from_proc() {
        let (cpu, rss, vsize, fds, max_fds, start) = process_stats().unwrap();
        assert!(cpu >= 0.0 && rss > 1 << 20 && vsize >= rss && fds >= 3 && max_fds >= fds && start > 1.6e9);
        let (text, ctype) = render(&[&process_registry()], false);
        assert_eq!(ctype, PROMETHEUS_TEXT);
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total "), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
    }
}
