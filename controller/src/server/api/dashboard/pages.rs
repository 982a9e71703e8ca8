//! The dashboard's pages: typed HTML templates (maud) over views that the
//! handlers fill from the store. Pure: no I/O, the time comes in the view.

use std::collections::BTreeMap;

use edgefleet_shared::protocol::DeviceState;
use edgefleet_shared::{Digest, UnixTime};
use maud::{DOCTYPE, Markup, html};

use super::chart::{self, Part};
use crate::server::api::Role;
use crate::server::db::{AuditRow, BundleRow, DeviceRow, EventRow, SampleRow, TelemetryRow};
use crate::server::engine::{Counts, Phase, WaveHealth};
use crate::server::fleet::{RolloutView, TelemetrySummary};

/// Who is looking, and the form token their actions carry.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// The token's name.
    pub name: String,
    /// Its role: what the page offers.
    pub role: Role,
    /// The session's form token (CSRF).
    pub csrf: String,
    /// Now, ms since the epoch.
    pub now: u64,
}

impl Viewer {
    fn can(&self, role: Role) -> bool {
        self.role >= role
    }
}

/// The sections of the navigation bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// `/`
    Fleet,
    /// `/devices`
    Devices,
    /// `/rollouts`
    Rollouts,
    /// `/bundles`
    Bundles,
    /// `/audit`
    Audit,
}

const SECTIONS: [(Section, &str, &str); 5] = [
    (Section::Fleet, "/", "Fleet"),
    (Section::Devices, "/devices", "Devices"),
    (Section::Rollouts, "/rollouts", "Rollouts"),
    (Section::Bundles, "/bundles", "Bundles"),
    (Section::Audit, "/audit", "Audit log"),
];

/// A whole page: head, navigation, the signed-in token, and `body` in
/// `<main>`; `live` pages refresh their `<main>` every few seconds.
pub fn layout(v: &Viewer, section: Section, title: &str, live: bool, body: Markup) -> Markup {
    html! {
        (head(title))
        body {
            header.top {
                a.brand href="/" { "edgefleet" }
                nav {
                    @for (s, href, label) in SECTIONS {
                        a href=(href) aria-current=[(s == section).then_some("page")] { (label) }
                    }
                }
                div.who {
                    span { (v.name) " · " (role_name(v.role)) }
                    form method="post" action="/logout" {
                        input type="hidden" name="csrf" value=(v.csrf);
                        button.link type="submit" { "Log out" }
                    }
                }
            }
            main #main data-live=[live.then_some("2000")] { h1 { (title) } (body) }
        }
    }
}

fn head(title: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en";
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · edgefleet" }
            link rel="stylesheet" href="/assets/dashboard.css";
            script src="/assets/dashboard.js" defer {}
        }
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Viewer => "viewer",
        Role::Operator => "operator",
        Role::Admin => "admin",
    }
}

/// The login page, with the reason of a refused attempt.
pub fn login(error: Option<&str>) -> Markup {
    html! {
        (head("Log in"))
        body.login {
            main {
                h1 { "edgefleet" }
                form.card method="post" action="/login" {
                    label for="token" { "API token" }
                    input #token type="password" name="token" autocomplete="current-password"
                        required autofocus maxlength="256";
                    @if let Some(e) = error { p.error role="alert" { (e) } }
                    button type="submit" { "Log in" }
                    p.muted { "The same bearer token as the API: its role decides what you can do." }
                }
            }
        }
    }
}

/// An error page: what went wrong and a way back.
pub fn error(v: Option<&Viewer>, status: u16, message: &str, back: &str) -> Markup {
    let body = html! {
        p.error role="alert" { (message) }
        p { a href=(back) { "Back" } }
    };
    match v {
        Some(v) => layout(v, Section::Fleet, &format!("Error {status}"), false, body),
        None => html! { (head("Error")) body { main { h1 { "Error " (status) } (body) } } },
    }
}

/// A time (ms since the epoch) as UTC, and how long ago.
fn when(ms: u64, now: u64) -> Markup {
    let utc = UnixTime(i64::try_from(ms / 1000).unwrap_or(i64::MAX)).to_string();
    html! { time datetime=(utc) title=(utc) { (ago(ms, now)) } }
}

/// "12 s ago", "3 min ago", "2 h ago", "4 d ago".
pub fn ago(ms: u64, now: u64) -> String {
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

fn short(d: &Digest) -> String {
    d.to_hex()[..12].to_owned()
}

fn flash(message: Option<&str>) -> Markup {
    html! { @if let Some(m) = message { p.flash role="status" { (m) } } }
}

/// A form that posts one action with the session's form token.
fn action(v: &Viewer, to: &str, label: &str, confirm: Option<&str>, extra: Markup) -> Markup {
    html! {
        form.action method="post" action=(to) data-confirm=[confirm] {
            input type="hidden" name="csrf" value=(v.csrf);
            (extra)
            button type="submit" { (label) }
        }
    }
}

// ----- fleet ----------------------------------------------------------------

/// What the fleet page shows.
#[derive(Debug, Default)]
pub struct FleetView {
    /// Every device.
    pub devices: usize,
    /// Of those, online.
    pub online: usize,
    /// (channel, version, digest) -> devices serving it.
    pub versions: BTreeMap<(String, String, Option<Digest>), usize>,
    /// Agent version -> devices.
    pub agents: BTreeMap<String, usize>,
    /// Devices whose latest drift window drifted, with the drifted features.
    pub drifting: Vec<(String, Vec<String>)>,
    /// Bundles whose fleet-wide drift is over the alert share.
    pub drift_alerts: Vec<(Digest, Option<(String, String)>)>,
    /// Rollouts still running.
    pub rollouts: Vec<RolloutView>,
    /// Latest failed installs.
    pub failed_installs: Vec<EventRow>,
    /// Revoked devices.
    pub revoked: Vec<String>,
}

/// The page an operator keeps open.
pub fn fleet(v: &Viewer, f: &FleetView) -> Markup {
    let body = html! {
        section.cards {
            div.card { p.big { (f.devices) } p { "devices" } }
            div.card { p.big { (f.online) } p { "online" } }
            div.card { p.big { (f.devices - f.online.min(f.devices)) } p { "offline" } }
            div.card { p.big { (f.drifting.len()) } p { "drifting" } }
            div.card { p.big { (f.rollouts.len()) } p { "rollouts running" } }
        }
        (chart::stacked_bar(&[
            Part { class: "ok", count: f.online, label: "online" },
            Part { class: "off", count: f.devices - f.online.min(f.devices), label: "offline" },
        ]))
        (alerts(f))
        section {
            h2 { "Rollouts in progress" }
            @if f.rollouts.is_empty() { p.muted { "none" } }
            @for r in &f.rollouts { (rollout_summary(r)) }
        }
        div.columns {
            section { h2 { "Versions" } (versions(&f.versions, f.devices)) }
            section { h2 { "Agent versions" } (counts_table("agent", &f.agents, f.devices)) }
        }
        section {
            h2 { "Drifting devices" }
            @if f.drifting.is_empty() { p.muted { "none in the last hour" } }
            ul { @for (d, features) in f.drifting.iter().take(50) {
                li { a href=(format!("/devices/{d}")) { (d) } " " span.muted { (features.join(", ")) } }
            } }
        }
    };
    layout(v, Section::Fleet, "Fleet", true, body)
}

fn alerts(f: &FleetView) -> Markup {
    let none = f.failed_installs.is_empty() && f.drift_alerts.is_empty() && f.revoked.is_empty();
    html! {
        section.alerts {
            h2 { "Alerts" }
            @if none { p.muted { "none" } }
            ul {
                @for (digest, name) in &f.drift_alerts {
                    li.alert { "Drift alert on "
                        a href=(format!("/bundles/{}", digest.to_hex())) {
                            @if let Some((c, ver)) = name { (c) " " (ver) } @else { (short(digest)) }
                        }
                    }
                }
                @for e in &f.failed_installs {
                    li.alert { "Install failed on " a href=(format!("/devices/{}", e.device)) { (e.device) }
                        ": " (failure_text(&e.body)) }
                }
                @for d in &f.revoked {
                    li { "Revoked: " a href=(format!("/devices/{d}")) { (d) } }
                }
            }
        }
    }
}

/// The reason of an `install_failed` event, as the rollout log words it.
pub fn failure_text(body: &serde_json::Value) -> String {
    let reason = body["kind"]["install_failed"]["reason"].clone();
    match serde_json::from_value(reason) {
        Ok(r) => crate::server::fleet::failure_text(&r),
        Err(_) => "failed (no reason given)".into(),
    }
}

fn versions(v: &BTreeMap<(String, String, Option<Digest>), usize>, total: usize) -> Markup {
    html! {
        table {
            thead { tr { th { "channel" } th { "version" } th.num { "devices" } th { "" } } }
            tbody { @for ((channel, version, digest), n) in v {
                tr {
                    td { (channel) }
                    td { @match digest {
                        Some(d) => a href=(format!("/bundles/{}", d.to_hex())) { (version) },
                        None => span.muted { (version) },
                    } }
                    td.num { (n) }
                    td.barcell { div.bar { span.ok style=(format!("width:{:.1}%", chart::share(*n, total))) {} } }
                }
            } }
        }
    }
}

fn counts_table(what: &str, counts: &BTreeMap<String, usize>, total: usize) -> Markup {
    html! {
        table {
            thead { tr { th { (what) } th.num { "devices" } th { "" } } }
            tbody { @for (k, n) in counts {
                tr { td { (k) } td.num { (n) }
                     td.barcell { div.bar { span.ok style=(format!("width:{:.1}%", chart::share(*n, total))) {} } } }
            } }
        }
    }
}

fn counts_bar(c: &Counts) -> Markup {
    chart::stacked_bar(&[
        Part {
            class: "ok",
            count: c.succeeded,
            label: "installed",
        },
        Part {
            class: "bad",
            count: c.failed,
            label: "failed",
        },
        Part {
            class: "busy",
            count: c.in_progress,
            label: "installing",
        },
        Part {
            class: "back",
            count: c.reverted,
            label: "reverted",
        },
        Part {
            class: "todo",
            count: c.pending,
            label: "pending",
        },
    ])
}

fn rollout_summary(r: &RolloutView) -> Markup {
    let e = &r.state;
    html! {
        div.rollout {
            p { a href=(format!("/rollouts/{}", r.id)) { (r.id) } " "
                span class=(format!("phase {}", e.phase.name())) { (e.phase.name()) }
                " wave " (e.wave + 1) " of " (e.waves.len()) }
            (counts_bar(&e.counts(None)))
        }
    }
}

// ----- devices --------------------------------------------------------------

/// The device list's filters, as the query string has them.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(default)]
pub struct DeviceQuery {
    /// Part of the id.
    pub q: String,
    /// `key=value,...`: all must match.
    pub tag: String,
    /// `online`, `offline` or empty.
    pub state: String,
    /// Channel of the active bundle.
    pub channel: String,
    /// Version of the active bundle.
    pub version: String,
    /// `yes`: only drifting devices.
    pub drifted: String,
    /// `id` (default) or `seen` (last seen, newest first).
    pub sort: String,
    /// Page number, from 1.
    pub page: usize,
}

impl DeviceQuery {
    /// The query string of this filter on page `page`.
    pub fn href(&self, page: usize) -> String {
        let pairs = [
            ("q", self.q.as_str()),
            ("tag", &self.tag),
            ("state", &self.state),
            ("channel", &self.channel),
            ("version", &self.version),
            ("drifted", &self.drifted),
            ("sort", &self.sort),
        ];
        let mut out = String::from("/devices?");
        for (k, val) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
            out.push_str(&format!("{k}={}&", percent_encode(val)));
        }
        out.push_str(&format!("page={page}"));
        out
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One page of the filtered device list.
#[derive(Debug)]
pub struct DevicesView {
    /// The devices of this page, with whether each is drifting.
    pub rows: Vec<(DeviceRow, bool)>,
    /// Devices matching the filter.
    pub matching: usize,
    /// The filter.
    pub query: DeviceQuery,
    /// Pages of matching devices.
    pub pages: usize,
    /// Channels known (for the filter's choices).
    pub channels: Vec<String>,
}

/// The device list, searchable, filtered, sorted and paged.
pub fn devices(v: &Viewer, d: &DevicesView) -> Markup {
    let q = &d.query;
    let body = html! {
        form.filters method="get" action="/devices" {
            input type="search" name="q" value=(q.q) placeholder="device id" aria-label="device id";
            input name="tag" value=(q.tag) placeholder="tags: site=a,line=2" aria-label="tags";
            select name="state" aria-label="state" {
                @for (val, label) in [("", "any state"), ("online", "online"), ("offline", "offline")] {
                    option value=(val) selected[q.state == val] { (label) }
                }
            }
            select name="channel" aria-label="channel" {
                option value="" { "any channel" }
                @for c in &d.channels { option value=(c) selected[&q.channel == c] { (c) } }
            }
            input name="version" value=(q.version) placeholder="version" aria-label="version";
            label { input type="checkbox" name="drifted" value="yes" checked[q.drifted == "yes"]; " drifting" }
            select name="sort" aria-label="sort" {
                option value="id" selected[q.sort != "seen"] { "by id" }
                option value="seen" selected[q.sort == "seen"] { "last seen first" }
            }
            button type="submit" { "Filter" }
        }
        p.muted { (d.matching) " devices match" }
        div.scroll { table.devices {
            thead { tr { th { "device" } th { "state" } th { "model" } th { "agent" } th { "tags" } th { "last seen" } } }
            tbody { @for (dev, drifting) in &d.rows { (device_row(v, dev, *drifting)) } }
        } }
        (pager(q, d.pages))
    };
    layout(v, Section::Devices, "Devices", false, body)
}

fn device_row(v: &Viewer, d: &DeviceRow, drifting: bool) -> Markup {
    html! {
        tr {
            td { a href=(format!("/devices/{}", d.id)) { (d.id) } }
            td { (online_badge(d.online)) @if drifting { " " span.badge.warn { "drift" } } }
            td { @if d.channels.is_empty() { span.muted { "none" } }
                 @for (i, c) in d.channels.iter().enumerate() { @if i > 0 { ", " } (c.channel) " " (c.version) } }
            td { (d.agent_version.as_deref().unwrap_or("–")) }
            td { (tags_text(&d.tags)) }
            td { @if let Some(l) = d.last_seen { (when(l, v.now)) } @else { span.muted { "never" } } }
        }
    }
}

fn tags_text(t: &crate::server::tags::Tags) -> String {
    t.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn online_badge(online: bool) -> Markup {
    html! { @if online { span.badge.ok { "online" } } @else { span.badge.off { "offline" } } }
}

fn pager(q: &DeviceQuery, pages: usize) -> Markup {
    let page = q.page.max(1);
    html! {
        nav.pager aria-label="pages" {
            @if page > 1 { a href=(q.href(page - 1)) rel="prev" { "← previous" } }
            span { "page " (page) " of " (pages.max(1)) }
            @if page < pages { a href=(q.href(page + 1)) rel="next" { "next →" } }
        }
    }
}

/// What a device's page shows.
#[derive(Debug)]
pub struct DeviceView {
    /// The device.
    pub device: DeviceRow,
    /// Its retained state, when it sent one.
    pub state: Option<DeviceState>,
    /// Latest events, newest first.
    pub events: Vec<EventRow>,
    /// Telemetry of the last hour, oldest first.
    pub telemetry: Vec<TelemetryRow>,
    /// Device metrics of the same samples: (receive time, `device_metrics`).
    pub metrics: Vec<(u64, serde_json::Value)>,
    /// Drift reports: (device time, receive time, report).
    pub drift: Vec<(u64, u64, serde_json::Value)>,
    /// Captured samples received.
    pub samples: Vec<SampleRow>,
    /// Whether its certificate was revoked.
    pub revoked: bool,
    /// The result of the action just taken.
    pub flash: Option<String>,
}

/// A device: identity, slots, install results, telemetry and drift charts,
/// samples, and the actions the viewer's role allows.
pub fn device(v: &Viewer, d: &DeviceView) -> Markup {
    let dev = &d.device;
    let body = html! {
        (flash(d.flash.as_deref()))
        dl.facts {
            dt { "state" } dd { (online_badge(dev.online)) @if d.revoked { " " span.badge.bad { "revoked" } } }
            dt { "tags" } dd { (tags_text(&dev.tags)) }
            dt { "last seen" } dd { @if let Some(l) = dev.last_seen { (when(l, v.now)) } @else { "never" } }
            dt { "agent" } dd { (dev.agent_version.as_deref().unwrap_or("–")) " on " (dev.arch.as_deref().unwrap_or("?")) }
        }
        (device_actions(v, d))
        (slots(d.state.as_ref()))
        section { h2 { "Telemetry, last hour" } div.charts { (telemetry_charts(&d.telemetry, &d.metrics)) } }
        (drift_charts(&d.drift))
        (events(v, &d.events))
        (samples(&d.samples))
    };
    layout(v, Section::Devices, dev.id.as_str(), true, body)
}

fn device_actions(v: &Viewer, d: &DeviceView) -> Markup {
    let base = format!("/devices/{}", d.device.id);
    // A device serving several channels: its actions name one.
    let channel = html! {
        @if d.device.channels.len() > 1 {
            select name="channel" aria-label="channel" {
                @for c in &d.device.channels { option value=(c.channel) { (c.channel) } }
            }
        }
    };
    html! {
        @if v.can(Role::Operator) {
            div.actions {
                (action(v, &format!("{base}/revert"), "Revert", Some("Revert this channel to its previous bundle?"), channel.clone()))
                (action(v, &format!("{base}/samples"), "Request samples", None,
                    html! { (channel) input type="number" name="max_samples" value="1000" min="1" max="100000" aria-label="samples"; }))
                (action(v, &format!("{base}/configure"), "Set telemetry period", None,
                    html! { input type="number" name="telemetry_interval_s" value="10" min="1" max="86400" aria-label="seconds"; }))
                @if v.can(Role::Admin) && !d.revoked {
                    (action(v, &format!("{base}/revoke"), "Revoke", Some("Revoke this device's certificate? It can no longer connect."), html! {}))
                }
            }
        }
    }
}

fn slots(state: Option<&DeviceState>) -> Markup {
    html! {
        section {
            h2 { "Slots" }
            @match state {
                None => p.muted { "the device has not reported its state" },
                Some(s) if s.slots.is_empty() => p.muted { "no bundle installed" },
                Some(s) => {
                    table {
                        thead { tr { th { "slot" } th { "role" } th { "bundle" } th { "release" } } }
                        tbody { @for slot in &s.slots { tr {
                            td { (format!("{:?}", slot.slot)) }
                            td { (format!("{:?}", slot.role).to_lowercase()) }
                            td { a href=(format!("/bundles/{}", slot.bundle.digest.to_hex())) {
                                (slot.bundle.channel.as_str()) " " (slot.bundle.version) } }
                            td { (slot.bundle.release) }
                        } } }
                    }
                    @if let Some(r) = &s.last_install {
                        p { "Last install: " (short(&r.digest)) " at " (r.at.to_string()) ": "
                            @match &r.failure {
                                None => span.badge.ok { "succeeded" },
                                Some(f) => span.badge.bad { (serde_json::to_string(f).unwrap_or_default()) },
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Points of a chart: (ms since the epoch, value).
pub type Series = Vec<(u64, f64)>;

/// What a device's cumulative counters say over each interval between two
/// samples: inferences per second, error rate (%) and p95 latency (ms).
#[derive(Debug, Default, PartialEq)]
pub struct Rates {
    /// Inferences per second.
    pub per_second: Series,
    /// Errors per answered request, %.
    pub error_percent: Series,
    /// p95 latency of the interval's requests, ms.
    pub p95_ms: Series,
}

/// [`Rates`] from consecutive samples; a counter that went back (a restart,
/// a new bundle) starts a new run instead of a negative rate.
pub fn rates(t: &[TelemetryRow]) -> Rates {
    let mut out = Rates::default();
    for w in t.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let (Some(ia), Some(ib)) = (a.inferences, b.inferences) else {
            continue;
        };
        let (ea, eb) = (a.errors.unwrap_or(0), b.errors.unwrap_or(0));
        if ib < ia || eb < ea || a.digest != b.digest || b.received_at <= a.received_at {
            continue;
        }
        let secs = (b.received_at - a.received_at) as f64 / 1000.0;
        let (di, de) = (ib - ia, eb - ea);
        out.per_second.push((b.received_at, di as f64 / secs));
        if di + de > 0 {
            out.error_percent
                .push((b.received_at, de as f64 * 100.0 / (di + de) as f64));
        }
        if let (Some(ha), Some(hb)) = (&a.latency_counts, &b.latency_counts)
            && ha.len() == hb.len()
        {
            let h: Vec<u64> = hb
                .iter()
                .zip(ha)
                .map(|(b, a)| b.saturating_sub(*a))
                .collect();
            let bounds = &edgefleet_shared::protocol::LATENCY_BOUNDS_US;
            if let Some(us) = edgefleet_shared::protocol::quantile_us(bounds, &h, 0.95) {
                out.p95_ms.push((b.received_at, us as f64 / 1000.0));
            }
        }
    }
    out
}

fn telemetry_charts(t: &[TelemetryRow], metrics: &[(u64, serde_json::Value)]) -> Markup {
    let r = rates(t);
    let field = |name: &str| -> Vec<(u64, f64)> {
        metrics
            .iter()
            .filter_map(|(at, m)| m[name].as_f64().map(|x| (*at, x)))
            .collect()
    };
    let disk_used: Vec<(u64, f64)> = metrics
        .iter()
        .filter_map(|(at, m)| Some((*at, (m["disk_total"].as_f64()? - m["disk_free"].as_f64()?))))
        .collect();
    let shadow: Vec<(u64, f64)> = t
        .iter()
        .filter_map(|r| {
            r.shadow
                .as_ref()
                .filter(|s| s.runs > 0)
                .map(|s| (r.received_at, s.agreed as f64 * 100.0 / s.runs as f64))
        })
        .collect();
    let rss: Vec<(u64, f64)> = t
        .iter()
        .filter_map(|r| r.rss_bytes.map(|x| (r.received_at, x as f64)))
        .collect();
    html! {
        (chart::line("Inference rate", "/s", &r.per_second))
        (chart::line("Error rate", "%", &r.error_percent))
        (chart::line("p95 latency", "ms", &r.p95_ms))
        (chart::line("CPU", "%", &field("cpu_percent")))
        (chart::line("Memory used", "bytes", &field("mem_used")))
        (chart::line("Agent RSS", "bytes", &rss))
        (chart::line("Disk used", "bytes", &disk_used))
        (chart::line("Temperature", "°C", &field("temperature_c")))
        @if !shadow.is_empty() { (chart::line("Shadow agreement", "%", &shadow)) }
    }
}

fn drift_charts(reports: &[(u64, u64, serde_json::Value)]) -> Markup {
    let mut by_feature: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    let mut drifted: BTreeMap<String, bool> = BTreeMap::new();
    for (_, received, r) in reports {
        for s in r["inputs"]
            .as_array()
            .into_iter()
            .chain(r["outputs"].as_array())
            .flatten()
        {
            let Some(name) = s["feature"].as_str() else {
                continue;
            };
            if let Some(psi) = s["psi"].as_f64() {
                by_feature
                    .entry(name.to_owned())
                    .or_default()
                    .push((*received, psi));
            }
            drifted.insert(name.to_owned(), s["drifted"].as_bool().unwrap_or(false));
        }
    }
    html! {
        section {
            h2 { "Drift per feature (PSI)" }
            @if by_feature.is_empty() { p.muted { "no drift reports in the last hour" } }
            div.charts { @for (f, series) in &by_feature {
                div class=[drifted.get(f).copied().unwrap_or(false).then_some("drifted")] {
                    (chart::line(f, "", series))
                }
            } }
        }
    }
}

fn events(v: &Viewer, events: &[EventRow]) -> Markup {
    html! {
        section {
            h2 { "Install results and events" }
            div.scroll { table {
                thead { tr { th { "when" } th { "event" } th { "bundle" } th { "detail" } } }
                tbody { @for e in events { tr {
                    td { (when(e.at.saturating_mul(1000), v.now)) }
                    td { span class=(format!("badge {}", event_class(&e.kind))) { (e.kind) } }
                    td { @if let Some(d) = &e.digest { a href=(format!("/bundles/{}", d.to_hex())) { (short(d)) } } }
                    td { @if e.kind == "install_failed" { (failure_text(&e.body)) } }
                } } }
            } }
        }
    }
}

fn event_class(kind: &str) -> &'static str {
    match kind {
        "install_failed" => "bad",
        "install_succeeded" | "activated" => "ok",
        "reverted" => "warn",
        _ => "off",
    }
}

fn samples(samples: &[SampleRow]) -> Markup {
    html! {
        section {
            h2 { "Captured samples" }
            @if samples.is_empty() { p.muted { "none received" } }
            @else {
                p { (samples.len()) " samples; "
                    a href=(format!("/api/v1/samples?device={}", samples[0].device)) { "export (API)" } }
                div.scroll { table {
                    thead { tr { th { "at" } th { "reason" } th { "bundle" } } }
                    tbody { @for s in samples.iter().rev().take(20) { tr {
                        td { (UnixTime(s.at).to_string()) } td { (s.reason) } td { (short(&s.digest)) }
                    } } }
                } }
            }
        }
    }
}

// ----- rollouts -------------------------------------------------------------

/// The rollout list.
pub fn rollouts(v: &Viewer, all: &[RolloutView], bundles: &BTreeMap<Digest, BundleRow>) -> Markup {
    let body = html! {
        @if all.is_empty() { p.muted { "no rollouts yet; start one with " code { "edgefleet rollout start" } } }
        @for r in all.iter().rev() {
            div.rollout {
                p { a href=(format!("/rollouts/{}", r.id)) { (r.id) } " " (bundle_name(&r.bundle, bundles)) " "
                    span class=(format!("phase {}", r.state.phase.name())) { (r.state.phase.name()) } }
                (counts_bar(&r.state.counts(None)))
            }
        }
    };
    layout(v, Section::Rollouts, "Rollouts", true, body)
}

fn bundle_name(d: &Digest, bundles: &BTreeMap<Digest, BundleRow>) -> Markup {
    html! {
        a href=(format!("/bundles/{}", d.to_hex())) {
            @if let Some(b) = bundles.get(d) { (b.channel) " " (b.version) } @else { (short(d)) }
        }
    }
}

/// What a rollout's page shows.
#[derive(Debug)]
pub struct RolloutPage {
    /// The rollout.
    pub rollout: RolloutView,
    /// Its decision log: (ms, note), oldest first.
    pub log: Vec<(u64, String)>,
    /// Stored bundles, to name it.
    pub bundles: BTreeMap<Digest, BundleRow>,
    /// Telemetry of each wave's devices now.
    pub waves: Vec<TelemetrySummary>,
    /// The current wave's health as the engine measures it.
    pub health: WaveHealth,
    /// The result of the action just taken.
    pub flash: Option<String>,
}

/// A rollout: waves with progress, gates against their measured values, the
/// decision log, live; pause / resume / promote / abort for operators.
pub fn rollout(v: &Viewer, p: &RolloutPage) -> Markup {
    let r = &p.rollout;
    let e = &r.state;
    let body = html! {
        (flash(p.flash.as_deref()))
        p { "Bundle " (bundle_name(&r.bundle, &p.bundles)) " · "
            span class=(format!("phase {}", e.phase.name())) #phase { (e.phase.name()) }
            " · wave " (e.wave + 1) " of " (e.waves.len()) }
        (phase_detail(&e.phase, v.now))
        (rollout_actions(v, r))
        section { h2 { "Waves" }
            @for (w, ids) in e.waves.iter().enumerate() {
                div.wave class=[(w == e.wave && !e.phase.finished()).then_some("current")] {
                    h3 { "Wave " (w + 1) " · " (plural(ids.len(), "device")) }
                    (counts_bar(&e.counts(Some(w))))
                }
            }
        }
        (gates(r, p.waves.get(e.wave), &p.health))
        section { h2 { "Decision log" }
            ol.log { @for (at, note) in &p.log { li { (when(*at, v.now)) " " (note) } } }
        }
    };
    layout(
        v,
        Section::Rollouts,
        &format!("Rollout {}", r.id),
        true,
        body,
    )
}

fn phase_detail(phase: &Phase, now: u64) -> Markup {
    html! {
        @match phase {
            Phase::Paused { reason, .. } => p.warn { "Paused: " (reason) },
            Phase::Halted { reason, .. } => p.error { "Halted: " (reason) },
            Phase::Soaking { until, .. } => p { "Soaking until " (UnixTime(i64::try_from(until / 1000).unwrap_or(0)).to_string())
                " (" (until.saturating_sub(now) / 1000) " s left)" },
            Phase::Aborted { reverted, .. } => p.warn { "Aborted" @if *reverted { ", devices told to revert" } },
            _ => {},
        }
    }
}

fn rollout_actions(v: &Viewer, r: &RolloutView) -> Markup {
    let base = format!("/rollouts/{}", r.id);
    let phase = &r.state.phase;
    let paused = matches!(phase, Phase::Paused { .. });
    html! {
        @if v.can(Role::Operator) && !phase.finished() {
            div.actions {
                @if paused { (action(v, &format!("{base}/resume"), "Resume", None, html! {})) }
                @else { (action(v, &format!("{base}/pause"), "Pause", None, html! {})) }
                (action(v, &format!("{base}/promote"), "Promote", Some("Skip the soak and start the next wave now?"), html! {}))
                (action(v, &format!("{base}/abort"), "Abort", Some("Abort this rollout?"),
                    html! { label { input type="checkbox" name="revert" value="yes"; " and revert" } }))
            }
        }
    }
}

fn gates(r: &RolloutView, wave: Option<&TelemetrySummary>, health: &WaveHealth) -> Markup {
    let e = &r.state;
    let g = &e.plan.gates;
    let c = e.counts(Some(e.wave));
    let n = e.waves.get(e.wave).map_or(0, Vec::len);
    let ratio = |x: usize| (n > 0).then(|| x as f64 / n as f64);
    // Install ratios are final once nobody in the wave is left to answer.
    let settled = c.pending + c.in_progress == 0;
    // (gate, measured, comparison, threshold, shown as a ratio "x" or a share "%")
    let rows: [(&str, Option<f64>, &str, f64, bool); 6] = [
        (
            "installed",
            ratio(c.succeeded),
            "≥",
            g.min_success_ratio,
            false,
        ),
        ("failed", ratio(c.failed), "≤", g.max_failure_ratio, false),
        (
            "error rate",
            health.error_rate,
            "≤",
            g.max_error_rate,
            false,
        ),
        (
            "p95 latency vs previous version",
            health.p95_latency_ratio,
            "≤",
            g.max_p95_latency_ratio,
            true,
        ),
        (
            "drift increase",
            health.drift_increase,
            "≤",
            g.max_drift_increase,
            false,
        ),
        (
            "shadow agreement",
            health.shadow_agreement,
            "≥",
            g.min_shadow_agreement,
            false,
        ),
    ];
    let show = |v: f64, times: bool| {
        if times {
            format!("{v:.2}x")
        } else {
            format!("{:.1}%", v * 100.0)
        }
    };
    html! {
        section { h2 { "Gates of wave " (e.wave + 1) }
            table.gates {
                thead { tr { th { "gate" } th.num { "measured" } th.num { "threshold" } th { "" } } }
                tbody { @for (name, measured, op, limit, times) in rows { tr {
                    td { (name) }
                    td.num { @if let Some(m) = measured { (show(m, times)) } @else { span.muted { "–" } } }
                    td.num { (op) " " (show(limit, times)) }
                    td { @if let Some(m) = measured { (gate_verdict(m, op, limit, settled || name != "installed")) } }
                } } }
                tr { td { "soak" } td.num {} td.num { (g.soak_ms / 1000) " s" } td {} }
            }
            p.muted { "Measured as the rollout engine does, from each device's latest telemetry since the phase began; "
                "– is not known yet (fewer than " (crate::server::fleet::MIN_INFERENCES) " inferences, or no device left on the previous version) and passes." }
            @if let Some(w) = wave { p.muted { "Wave telemetry: " (w.devices) " devices reporting, "
                (w.inferences) " inferences, p95 " (w.p95_us.map_or("–".into(), |u| format!("{:.1} ms", u as f64 / 1000.0))) } }
        }
    }
}

fn gate_verdict(measured: f64, op: &str, limit: f64, settled: bool) -> Markup {
    let ok = if op == "≥" {
        measured >= limit
    } else {
        measured <= limit
    };
    html! {
        @if ok { span.badge.ok { "met" } }
        @else if settled { span.badge.bad { "not met" } }
        @else { span.badge.off { "waiting" } }
    }
}

/// "1 device", "5 devices".
pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

// ----- bundles and audit ------------------------------------------------------

/// The stored bundles, with how many devices serve each.
pub fn bundles(v: &Viewer, all: &[BundleRow], running: &BTreeMap<Digest, usize>) -> Markup {
    let body = html! {
        div.scroll { table {
            thead { tr { th { "channel" } th { "version" } th.num { "release" } th { "digest" } th.num { "size" } th.num { "devices" } th { "uploaded" } } }
            tbody { @for b in all.iter().rev() { tr {
                td { (b.channel) } td { a href=(format!("/bundles/{}", b.digest.to_hex())) { (b.version) } }
                td.num { (b.release) } td { code { (short(&b.digest)) } }
                td.num { (chart::format_bytes(b.size as f64)) }
                td.num { (running.get(&b.digest).copied().unwrap_or(0)) }
                td { (when(b.uploaded_at, v.now)) " by " (b.uploaded_by) }
            } } }
        } }
    };
    layout(v, Section::Bundles, "Bundles", false, body)
}

/// One bundle: manifest summary (schema, artifacts, signers, golden cases,
/// reference statistics) and where it runs.
pub fn bundle(v: &Viewer, b: &BundleRow, running: usize) -> Markup {
    let body = html! {
        dl.facts {
            dt { "digest" } dd { code { (b.digest.to_hex()) } }
            dt { "release" } dd { (b.release) }
            dt { "size" } dd { (chart::format_bytes(b.size as f64)) " in " (plural(b.chunks as usize, "chunk")) }
            dt { "created" } dd { (UnixTime(b.created_at as i64).to_string()) }
            dt { "expires" } dd { (UnixTime(b.expires_at as i64).to_string()) }
            dt { "uploaded" } dd { (when(b.uploaded_at, v.now)) " by " (b.uploaded_by) }
            dt { "runs on" } dd { a href=(format!("/devices?channel={}&version={}", percent_encode(&b.channel), percent_encode(&b.version))) { (running) " devices" } }
        }
        @if let Some(obj) = b.summary.as_object() {
            @for (key, value) in obj {
                section { h2 { (key) } (json_block(value)) }
            }
        }
    };
    layout(
        v,
        Section::Bundles,
        &format!("{} {}", b.channel, b.version),
        false,
        body,
    )
}

/// A JSON value for reading: scalars inline, arrays of objects as tables,
/// the rest pretty-printed.
fn json_block(value: &serde_json::Value) -> Markup {
    match value {
        serde_json::Value::Array(items)
            if items.iter().all(|i| i.is_object()) && !items.is_empty() =>
        {
            let mut keys: Vec<&String> = Vec::new();
            for i in items {
                for k in i.as_object().into_iter().flat_map(|o| o.keys()) {
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
            }
            html! { div.scroll { table {
                thead { tr { @for k in &keys { th { (k) } } } }
                tbody { @for i in items { tr { @for k in &keys { td { (scalar(&i[k.as_str()])) } } } } }
            } } }
        }
        serde_json::Value::String(_)
        | serde_json::Value::Number(_)
        | serde_json::Value::Bool(_) => {
            html! { p { (scalar(value)) } }
        }
        other => html! { pre { (serde_json::to_string_pretty(other).unwrap_or_default()) } },
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The audit log, newest first.
pub fn audit(v: &Viewer, rows: &[AuditRow]) -> Markup {
    let body = html! {
        div.scroll { table.audit {
            thead { tr { th { "when" } th { "who" } th { "what" } th { "target" } th { "after" } } }
            tbody { @for a in rows { tr {
                td { (when(a.at, v.now)) } td { (a.actor) } td { code { (a.action) } }
                td { (a.target) }
                td { @if let Some(after) = &a.after { code.small { (after.to_string()) } } }
            } } }
        } }
    };
    layout(v, Section::Audit, "Audit log", true, body)
}

/// The stylesheet and script, shipped in the binary.
pub const CSS: &str = include_str!("dashboard.css");
/// See [`CSS`].
pub const JS: &str = include_str!("dashboard.js");

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_s: u64, inferences: u64, errors: u64, slow: u64, digest: u8) -> TelemetryRow {
        let n = edgefleet_shared::protocol::LATENCY_BOUNDS_US.len() + 1;
        let mut counts = vec![0u64; n];
        counts[0] = inferences - slow;
        counts[n - 2] = slow;
        TelemetryRow {
            device: edgefleet_shared::DeviceId::new("d").expect("id"),
            seq: at_s,
            at: at_s,
            received_at: at_s * 1000,
            digest: Some(Digest::of(&[digest])),
            inferences: Some(inferences),
            errors: Some(errors),
            latency_counts: Some(counts),
            cpu_percent: None,
            mem_used: None,
            rss_bytes: None,
            drift: None,
            shadow: None,
            spool_dropped: None,
        }
    }

    #[test]
    fn rates_come_from_the_counters_differences() {
        let r = rates(&[
            sample(0, 100, 0, 0, 1),
            sample(10, 300, 0, 0, 1),
            sample(20, 400, 25, 100, 1),
        ]);
        assert_eq!(r.per_second, vec![(10_000, 20.0), (20_000, 10.0)]);
        assert_eq!(r.error_percent, vec![(10_000, 0.0), (20_000, 20.0)]);
        assert_eq!(r.p95_ms.len(), 2);
        assert!(
            r.p95_ms[1].1 > r.p95_ms[0].1,
            "the slow interval's p95 is higher: {:?}",
            r.p95_ms
        );
    }

    #[test]
    fn a_restart_or_a_new_bundle_is_not_a_negative_rate() {
        let r = rates(&[
            sample(0, 500, 5, 0, 1),
            sample(10, 50, 0, 0, 1),
            sample(20, 150, 0, 0, 2),
            sample(30, 250, 0, 0, 2),
        ]);
        assert_eq!(r.per_second, vec![(30_000, 10.0)]);
        assert!(rates(&[]).per_second.is_empty());
    }

    #[test]
    fn the_device_query_keeps_its_filters_across_pages() {
        let q = DeviceQuery {
            q: "cam 1".into(),
            tag: "site=a&b".into(),
            page: 3,
            ..Default::default()
        };
        assert_eq!(q.href(4), "/devices?q=cam%201&tag=site%3Da%26b&page=4");
        assert_eq!(plural(1, "device"), "1 device");
        assert_eq!(plural(0, "device"), "0 devices");
        assert_eq!(ago(1_000, 61_000), "1 min ago");
    }

    #[test]
    fn install_failures_read_with_their_stage_and_refusal_code() {
        let refused = serde_json::json!({"kind": {"install_failed": {"digest": "00",
            "reason": {"stage": "refused", "refusal": {"code": "rollback", "channel": "iris", "release": 1, "installed": 2}}}}});
        let text = failure_text(&refused);
        assert!(text.starts_with("refused (rollback): "), "{text}");
        let health = serde_json::json!({"kind": {"install_failed": {"digest": "00",
            "reason": {"stage": "health_check", "detail": "golden case 1 differs"}}}});
        assert_eq!(failure_text(&health), "health_check: golden case 1 differs");
        assert_eq!(
            failure_text(&serde_json::json!({})),
            "failed (no reason given)"
        );
    }

    #[test]
    fn a_viewer_is_offered_no_action_and_an_operator_is() {
        let v = |role| Viewer {
            name: "n".into(),
            role,
            csrf: "c".into(),
            now: 0,
        };
        let bundle = BundleRow {
            digest: Digest::of(b"b"),
            channel: "iris".into(),
            version: "1.0.0".into(),
            release: 1,
            size: 10,
            chunks: 1,
            created_at: 0,
            expires_at: 0,
            uploaded_at: 0,
            uploaded_by: "a".into(),
            summary: serde_json::json!({}),
        };
        let ids = vec![edgefleet_shared::DeviceId::new("d1").expect("id")];
        let state = crate::server::engine::Rollout::new("r1", &ids, Default::default(), 0)
            .expect("rollout");
        let page = RolloutPage {
            rollout: RolloutView {
                id: "r1".into(),
                bundle: bundle.digest,
                state,
            },
            log: vec![(0, "wave 1 started".into())],
            bundles: [(bundle.digest, bundle)].into_iter().collect(),
            waves: Vec::new(),
            health: WaveHealth::default(),
            flash: None,
        };
        let viewer = rollout(&v(Role::Viewer), &page).into_string();
        assert!(
            !viewer.contains("/pause")
                && !viewer.contains("name=\"csrf\" value=\"c\"><button type=\"submit\">Abort"),
            "{viewer}"
        );
        assert!(viewer.contains("wave 1 started") && viewer.contains("iris 1.0.0"));
        let operator = rollout(&v(Role::Operator), &page).into_string();
        assert!(
            operator.contains("action=\"/rollouts/r1/pause\"") && operator.contains("Abort"),
            "{operator}"
        );
    }
}
