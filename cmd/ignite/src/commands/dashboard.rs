//! `ignite dashboard`: a live terminal view of the fleet (ratatui), fed by the API's streams:
//! VMs from `Vms.Watch` (resumed from the last revision after a disconnect), events from
//! `Events.Watch`, and sources, host and the selected VM's console polled every second.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use controller::grpc::proto::{self, vm_event::Kind};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;

use super::client::{self, Ctx};

/// `ignite dashboard`.
#[derive(Args)]
#[command(after_help = "Keys: ↑/↓ (or k/j) select a VM, q or Esc quits.")]
pub struct DashboardArgs {
    /// How many recent events to keep on screen.
    #[arg(long, default_value_t = 200)]
    events: usize,
}

/// What the screen shows, updated by the background tasks.
#[derive(Default)]
struct State {
    vms: BTreeMap<String, proto::Vm>,
    /// The store revision of the last VM change seen (a reconnect resumes from here).
    revision: u64,
    events: VecDeque<proto::Event>,
    sources: Vec<proto::SourceStatus>,
    host: Option<proto::HostInfo>,
    /// The name of the selected VM, and the tail of its console.
    selected: Option<String>,
    console: String,
    /// Why the daemon cannot be reached right now.
    disconnected: Option<String>,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long to wait before reconnecting a stream that broke.
const RECONNECT: Duration = Duration::from_secs(1);

/// A channel to the daemon. Reconnects never start a daemon (that would print over the screen,
/// and a daemon that went away was stopped for a reason).
async fn reconnect(ctx: &Ctx) -> anyhow::Result<tonic::transport::Channel> {
    client::connect(ctx).await
}

/// Follows VM changes, resuming from the last revision seen after a disconnect.
async fn watch_vms(ctx: Ctx, state: Shared) {
    loop {
        let result = async {
            let mut c = proto::vms_client::VmsClient::new(reconnect(&ctx).await?);
            let from_revision = lock(&state).revision;
            let request = proto::WatchVmsRequest { snapshot: from_revision == 0, from_revision };
            let mut stream = c.watch(request).await.map_err(client::status)?.into_inner();
            lock(&state).disconnected = None;
            while let Some(e) = stream.message().await.map_err(client::status)? {
                let mut s = lock(&state);
                match Kind::try_from(e.kind) {
                    Ok(Kind::Upsert) => {
                        if let Some(vm) = e.vm {
                            s.vms.insert(e.name, vm);
                        }
                    }
                    Ok(Kind::Delete) => {
                        s.vms.remove(&e.name);
                    }
                    Ok(Kind::Resync) => s.vms.clear(),
                    _ => {}
                }
                s.revision = s.revision.max(e.revision);
            }
            anyhow::Ok(())
        }
        .await;
        let why = match result {
            Ok(()) => "the daemon closed the VM stream".to_string(),
            Err(e) => super::error_chain(&e),
        };
        lock(&state).disconnected = Some(why);
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Follows events, resuming after the last sequence number seen.
async fn watch_events(ctx: Ctx, state: Shared, keep: usize) {
    let mut after_seq = 0;
    loop {
        let _ = async {
            let mut c = proto::events_client::EventsClient::new(reconnect(&ctx).await?);
            let mut stream = c
                .watch(proto::WatchEventsRequest { after_seq, follow: true })
                .await
                .map_err(client::status)?
                .into_inner();
            while let Some(e) = stream.message().await.map_err(client::status)? {
                after_seq = e.seq;
                let mut s = lock(&state);
                s.events.push_back(e);
                while s.events.len() > keep {
                    s.events.pop_front();
                }
            }
            anyhow::Ok(())
        }
        .await;
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Polls what has no stream: sources, host, and the selected VM's console.
async fn poll(ctx: Ctx, state: Shared) {
    loop {
        if let Some(channel) = client::try_channel(&ctx).await {
            let mut sources = proto::sources_client::SourcesClient::new(channel.clone());
            let mut host = proto::host_client::HostClient::new(channel.clone());
            let mut vms = proto::vms_client::VmsClient::new(channel);
            if let Ok(listed) = sources.list(proto::Empty {}).await {
                lock(&state).sources = listed.into_inner().sources;
            }
            if let Ok(info) = host.info(proto::Empty {}).await {
                lock(&state).host = Some(info.into_inner());
            }
            let selected = lock(&state).selected.clone();
            if let Some(name) = selected {
                let request = proto::LogsRequest { name, follow: false, tail_bytes: 4096 };
                let mut console = Vec::new();
                if let Ok(stream) = vms.logs(request).await {
                    let mut stream = stream.into_inner();
                    while let Ok(Some(chunk)) = stream.message().await {
                        console.extend(chunk.data);
                    }
                }
                lock(&state).console = String::from_utf8_lossy(&console).into_owned();
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn phase_style(phase: &str) -> Style {
    match phase {
        "Running" => Style::new().fg(Color::Green),
        "Failed" => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        "Pending" | "Creating" | "Deleting" => Style::new().fg(Color::Yellow),
        _ => Style::new().fg(Color::DarkGray),
    }
}

fn uptime(vm: &proto::Vm) -> String {
    let status = vm.status.clone().unwrap_or_default();
    if status.phase != "Running" {
        return "-".into();
    }
    let Ok(t) = humantime::parse_rfc3339(&status.boot_time) else { return "-".into() };
    let secs = t.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn header(s: &State, daemon: &str) -> Line<'static> {
    let running = s.vms.values().filter(|v| v.status.as_ref().is_some_and(|st| st.phase == "Running")).count();
    let mut spans = vec![
        Span::styled(" ignite dashboard ", Style::new().bold().reversed()),
        Span::raw(format!("  {}  ·  {} VMs, {running} running  ·  revision {}", daemon, s.vms.len(), s.revision)),
    ];
    if let Some(h) = &s.host {
        spans.push(Span::raw(format!("  ·  {} {}  ·  disks: {}", h.virt_mode, h.version, h.snapshotter)));
    }
    if let Some(why) = &s.disconnected {
        spans
            .push(Span::styled(format!("  ·  DISCONNECTED ({why}), reconnecting"), Style::new().fg(Color::Red).bold()));
    }
    Line::from(spans)
}

/// The VM table's columns: header, width, and whether it is shown on a narrow pane. The essential
/// ones always fit whole (a phase cut to "Runnin" or an address to "10.61." reads as garbage); the
/// others are dropped, last first, when the pane is too narrow for them.
const VM_COLUMNS: [(&str, u16, bool); 8] = [
    ("NAME", 10, true),
    ("PHASE", 9, true),
    ("READY", 5, true),
    ("IP", 15, true),
    ("UPTIME", 10, true),
    ("IMAGE", 20, false),
    ("OWNER", 12, false),
    ("REVISION", 12, false),
];

/// Which of [`VM_COLUMNS`] fit in a pane `width` columns wide (borders included).
fn vm_columns(width: u16) -> Vec<usize> {
    let mut budget = width.saturating_sub(2);
    let mut shown = Vec::new();
    for (i, (_, w, essential)) in VM_COLUMNS.iter().enumerate() {
        let need = w + u16::from(!shown.is_empty());
        if *essential || need <= budget {
            budget = budget.saturating_sub(need);
            shown.push(i);
        }
    }
    shown
}

fn vm_table(s: &State, width: u16) -> Table<'static> {
    let columns = vm_columns(width);
    let rows: Vec<Row> = s
        .vms
        .values()
        .map(|vm| {
            let st = vm.status.clone().unwrap_or_default();
            let ready =
                st.conditions.iter().find(|c| c.r#type == "Ready").map(|c| c.status.clone()).unwrap_or_default();
            let cells = [
                Cell::from(vm.name.clone()),
                Cell::from(st.phase.clone()).style(phase_style(&st.phase)),
                Cell::from(ready),
                Cell::from(st.ip.clone()),
                Cell::from(uptime(vm)),
                Cell::from(vm.image.clone()),
                Cell::from(vm.owner.clone()),
                Cell::from(st.observed_revision.chars().take(12).collect::<String>()),
            ];
            Row::new(cells.into_iter().enumerate().filter(|(i, _)| columns.contains(i)).map(|(_, c)| c))
        })
        .collect();
    // NAME as wide as the longest name (within reason), IMAGE takes what is left over.
    let longest = s.vms.keys().map(|n| n.chars().count()).max().unwrap_or(0);
    let name_width = (longest as u16).clamp(VM_COLUMNS[0].1, 32);
    let widths = columns.iter().map(|&i| match VM_COLUMNS[i] {
        ("IMAGE", _, _) => Constraint::Fill(1),
        ("NAME", _, _) => Constraint::Length(name_width),
        (_, w, _) => Constraint::Length(w),
    });
    Table::new(rows, widths)
        .header(Row::new(columns.iter().map(|&i| VM_COLUMNS[i].0)).style(Style::new().bold().underlined()))
        .row_highlight_style(Style::new().reversed())
        .block(Block::default().borders(Borders::ALL).title(" VMs "))
}

fn details(s: &State) -> Paragraph<'static> {
    let mut lines = Vec::new();
    let vm = s.selected.as_ref().and_then(|n| s.vms.get(n));
    if let Some(vm) = vm {
        let st = vm.status.clone().unwrap_or_default();
        lines.push(Line::from(vec![
            Span::styled(vm.name.clone(), Style::new().bold()),
            Span::raw(format!("  generation {}  restarts {}  mac {}", vm.generation, st.restarts, st.mac)),
        ]));
        for c in &st.conditions {
            let why = if c.reason.is_empty() { String::new() } else { format!(" {}: {}", c.reason, c.message) };
            lines.push(Line::from(format!("{}={}{why}", c.r#type, c.status)));
        }
        if !st.last_error.is_empty() {
            lines.push(Line::styled(format!("last error: {}", st.last_error), Style::new().fg(Color::Red)));
        }
        if !st.node_ref.is_empty() {
            lines.push(Line::from(format!("kubernetes node: {}", st.node_ref)));
        }
        lines.push(Line::styled("console:", Style::new().bold()));
        let tail: Vec<&str> = s.console.lines().rev().take(12).collect();
        lines.extend(tail.into_iter().rev().map(|l| Line::from(l.to_string())));
    } else {
        lines.push(Line::from("no VM selected"));
    }
    Paragraph::new(lines).wrap(Wrap { trim: false }).block(Block::default().borders(Borders::ALL).title(" details "))
}

fn sources_table(s: &State) -> Table<'static> {
    let rows: Vec<Row> = s
        .sources
        .iter()
        .map(|src| {
            let error = Cell::from(src.last_error.clone()).style(Style::new().fg(Color::Red));
            Row::new(vec![
                Cell::from(src.name.clone()),
                Cell::from(src.url.clone()),
                Cell::from(src.revision.chars().take(12).collect::<String>()),
                Cell::from(src.last_sync.clone()),
                error,
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(12),
        Constraint::Min(20),
        Constraint::Length(12),
        Constraint::Length(25),
        Constraint::Min(20),
    ];
    Table::new(rows, widths)
        .header(
            Row::new(["SOURCE", "URL", "REVISION", "LAST SYNC", "LAST ERROR"]).style(Style::new().bold().underlined()),
        )
        .block(Block::default().borders(Borders::ALL).title(" sources "))
}

fn events_list(s: &State, height: u16) -> Paragraph<'static> {
    let shown = usize::from(height.saturating_sub(2));
    let lines: Vec<Line> = s
        .events
        .iter()
        .rev()
        .take(shown)
        .rev()
        .map(|e| {
            let style = if e.kind == "Warning" { Style::new().fg(Color::Yellow) } else { Style::new() };
            let time = e.time.get(11..19).unwrap_or(&e.time).to_string();
            Line::styled(format!("{time}  {:<14} {:<16} {}", e.object, e.reason, e.message), style)
        })
        .collect();
    Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" events "))
}

fn draw(frame: &mut Frame, s: &State, table: &mut TableState, daemon: &str) {
    let [top, main, sources, events, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(8),
        Constraint::Length(s.sources.len().max(1) as u16 + 3),
        Constraint::Length(10),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header(s, daemon)), top);
    let [list, detail]: [Rect; 2] =
        Layout::horizontal([Constraint::Percentage(62), Constraint::Percentage(38)]).areas(main);
    frame.render_stateful_widget(vm_table(s, list.width), list, table);
    frame.render_widget(details(s), detail);
    frame.render_widget(sources_table(s), sources);
    frame.render_widget(events_list(s, events.height), events);
    frame.render_widget(Paragraph::new(" ↑/↓ select   q quit").dim(), footer);
}

/// Moves the selection by `delta` rows and records the selected name.
fn select(state: &Shared, table: &mut TableState, delta: isize) {
    let mut s = lock(state);
    let count = s.vms.len();
    if count == 0 {
        table.select(None);
        s.selected = None;
        return;
    }
    let current = table.selected().unwrap_or(0) as isize;
    let next = (current + delta).clamp(0, count as isize - 1) as usize;
    table.select(Some(next));
    let name = s.vms.keys().nth(next).cloned();
    if name != s.selected {
        s.console.clear();
        s.selected = name;
    }
}

/// Runs the dashboard until q, Esc or Ctrl-C.
pub fn run(args: DashboardArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting tokio")?;
    // Connect once up front, so that a missing daemon is an error (or is started) before the
    // screen switches to the dashboard.
    runtime.block_on(client::channel(ctx))?;
    let state: Shared = Arc::default();
    runtime.spawn(watch_vms(ctx.clone(), state.clone()));
    runtime.spawn(watch_events(ctx.clone(), state.clone(), args.events.max(1)));
    runtime.spawn(poll(ctx.clone(), state.clone()));

    let mut terminal = ratatui::init();
    let mut table = TableState::default();
    let result = (|| -> anyhow::Result<()> {
        loop {
            select(&state, &mut table, 0);
            {
                let s = lock(&state);
                terminal.draw(|frame| draw(frame, &s, &mut table, &ctx.daemon()))?;
            }
            if !event::poll(Duration::from_millis(250))? {
                continue;
            }
            if let Event::Key(key) = event::read()? {
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
                    KeyCode::Down | KeyCode::Char('j') => select(&state, &mut table, 1),
                    KeyCode::Up | KeyCode::Char('k') => select(&state, &mut table, -1),
                    _ => {}
                }
            }
        }
    })();
    ratatui::restore();
    runtime.shutdown_background();
    result
}

#[cfg(test)]
mod tests {
    use super::{vm_columns, VM_COLUMNS};

    fn headers(width: u16) -> Vec<&'static str> {
        vm_columns(width).into_iter().map(|i| VM_COLUMNS[i].0).collect()
    }

    #[test]
    fn narrow_panes_drop_the_optional_columns_last_first_and_keep_the_essential_whole() {
        assert_eq!(headers(200), ["NAME", "PHASE", "READY", "IP", "UPTIME", "IMAGE", "OWNER", "REVISION"]);
        // The VM pane of a 140-column terminal.
        assert_eq!(headers(86), ["NAME", "PHASE", "READY", "IP", "UPTIME", "IMAGE"]);
        assert_eq!(headers(30), ["NAME", "PHASE", "READY", "IP", "UPTIME"]);
        // What is shown fits: the widths and one space between columns, inside the borders.
        for width in [60u16, 86, 100, 120] {
            let used: u16 = vm_columns(width).iter().map(|&i| VM_COLUMNS[i].1 + 1).sum::<u16>() - 1;
            assert!(used <= width - 2, "{width}: {used}");
        }
    }
}
