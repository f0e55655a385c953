//! What the benchmark programs share: a row of figures and the table that prints them with ratios.

/// One measured figure for ignite and its peer.
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Unit of both figures.
    pub unit: &'static str,
    /// ignite's figure.
    pub ours: Option<f64>,
    /// The peer's figure.
    pub theirs: Option<f64>,
    /// Shown instead of the figures when set (e.g. a feature this host lacks).
    pub note: Option<String>,
}

impl Row {
    /// A row in milliseconds.
    pub fn ms(name: &str, ours: Option<f64>, theirs: Option<f64>) -> Row {
        Row { name: name.into(), unit: "ms", ours, theirs, note: None }
    }
}

/// Prints `rows` with the ratio peer/ignite (above 1 means ignite is faster or smaller).
pub fn print_table(peer: &str, rows: &[Row]) {
    println!("\n{:<56} {:>12} {:>14} {:>18}", "metric", "ignite", peer, format!("ratio {peer}/ignite"));
    let fmt = |v: Option<f64>, unit: &str| v.map_or("n/a".to_string(), |v| format!("{v:.1} {unit}"));
    for row in rows {
        if let Some(note) = &row.note {
            println!("{:<56} {note}", row.name);
            continue;
        }
        let ratio = match (row.ours, row.theirs) {
            (Some(o), Some(t)) if o > 0.0 => format!("{:.2}x", t / o),
            _ => "n/a".into(),
        };
        println!("{:<56} {:>12} {:>14} {:>18}", row.name, fmt(row.ours, row.unit), fmt(row.theirs, row.unit), ratio);
    }
}

/// The median, or `None` for no samples.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// The options `bench-vmm` and `bench-snapshot` share: `--runs N` (default `default_runs`) and
/// `--skip-linux`. Prints `usage` and exits for `--help`; exits with 2 on an unknown option.
pub struct Options {
    /// Runs per figure.
    pub runs: usize,
    /// Leave out the Linux guest (a minute or more per boot where KVM emulates guests).
    pub skip_linux: bool,
}

impl Options {
    /// Parses this process's arguments for `program`.
    pub fn parse(program: &str, usage: &str, default_runs: usize) -> Options {
        let args: Vec<String> = std::env::args().collect();
        if args.iter().any(|a| a == "--help" || a == "-h") {
            println!("{usage}");
            std::process::exit(0);
        }
        if let Some(unknown) =
            args.iter().skip(1).find(|a| a.starts_with('-') && *a != "--runs" && *a != "--skip-linux")
        {
            eprintln!("{program}: unknown option {unknown}\n{usage}");
            std::process::exit(2);
        }
        let runs = args.iter().position(|a| a == "--runs").and_then(|i| args.get(i + 1)).and_then(|n| n.parse().ok());
        Options { runs: runs.unwrap_or(default_runs), skip_linux: args.iter().any(|a| a == "--skip-linux") }
    }
}
