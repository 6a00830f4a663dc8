//! Text for people: tables sized to their content, aligned key/value blocks, and durations
//! as `1h 27m 14s`. Pure functions; the commands build their rows and print the result.

use std::time::Duration;

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    /// Numbers and sizes.
    Right,
}

/// A table: a header row and rows of cells, each column as wide as its widest cell, columns
/// two spaces apart, no trailing blanks.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns named `headers`, left-aligned unless `right` makes them right-aligned.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            align: vec![Align::Left; headers.len()],
            rows: Vec::new(),
        }
    }

    /// Right-aligns the columns named `columns` (numbers, sizes, durations).
    pub fn right(mut self, columns: &[&str]) -> Table {
        for (h, a) in self.headers.iter().zip(self.align.iter_mut()) {
            if columns.contains(&h.as_str()) {
                *a = Align::Right;
            }
        }
        self
    }

    /// Adds a row; missing cells are empty, extra ones are dropped.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut r: Vec<String> = cells.into_iter().map(Into::into).collect();
        r.resize(self.headers.len(), String::new());
        self.rows.push(r);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as lines, each ending in a newline. Widths count characters, not bytes.
    pub fn render(&self) -> String {
        let n = self.headers.len();
        let mut width: Vec<usize> = self.headers.iter().map(|h| chars(h)).collect();
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(chars(c));
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = width[i] - chars(c);
                match self.align[i] {
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(c);
                    }
                    Align::Left => {
                        line.push_str(c);
                        if i + 1 < n {
                            line.extend(std::iter::repeat_n(' ', pad));
                        }
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `key: value` lines with the values lined up; a value of several lines is indented under
/// the first.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| chars(k)).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in pairs {
        let key = format!("{k}:");
        let mut lines = v.lines();
        let first = lines.next().unwrap_or("");
        let line = format!("{key:<width$} {first}");
        out.push_str(line.trim_end());
        out.push('\n');
        for l in lines {
            out.push_str(&format!("{:width$} {l}\n", ""));
        }
    }
    out
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// A duration for people: `1h 27m 14s`, `3m 5s`, `42s`; under ten seconds with a tenth
/// (`2.4s`), under one second in milliseconds (`350ms`); days above a day (`2d 3h 0m`).
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 10_000 {
        return format!("{}.{}s", ms / 1000, (ms % 1000) / 100);
    }
    duration_secs(d.as_secs())
}

/// Whole seconds for people: `1h 27m 14s`, `3m 5s`, `0s`; days above a day (`2d 3h 0m`).
pub fn duration_secs(s: u64) -> String {
    let (days, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (days, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{days}d {h}h {m}m"),
    }
}

/// `duration` of a number of milliseconds.
pub fn duration_ms(ms: u64) -> String {
    duration(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_clock() {
        let s = Duration::from_secs;
        assert_eq!(duration(s(5234)), "1h 27m 14s");
        assert_eq!(duration(s(3600)), "1h 0m 0s");
        assert_eq!(duration(s(185)), "3m 5s");
        assert_eq!(duration(s(60)), "1m 0s");
        assert_eq!(duration(s(42)), "42s");
        assert_eq!(duration(s(10)), "10s");
        assert_eq!(duration(Duration::from_millis(2450)), "2.4s");
        assert_eq!(duration(Duration::from_millis(999)), "999ms");
        assert_eq!(duration(Duration::ZERO), "0ms");
        assert_eq!(duration(s(2 * 86_400 + 3 * 3600 + 59)), "2d 3h 0m");
        assert_eq!(duration_ms(90_000), "1m 30s");
        assert_eq!(duration_secs(0), "0s");
        assert_eq!(duration_secs(7), "7s");
        assert_eq!(duration_secs(5234), "1h 27m 14s");
    }

    #[test]
    fn a_table_is_as_wide_as_its_content() {
        let mut t = Table::new(&["ID", "VM", "SIZE", "NOTE"]).right(&["SIZE"]);
        t.row(["a1", "web", "1.0 GiB", "x"]);
        t.row(["b", "database-01", "12 B", ""]);
        assert_eq!(
            t.render(),
            "ID  VM              SIZE  NOTE\n\
             a1  web          1.0 GiB  x\n\
             b   database-01     12 B\n"
        );
        // No rows: the header alone, as wide as itself.
        assert_eq!(Table::new(&["A", "BB"]).render(), "A  BB\n");
    }

    #[test]
    fn a_table_counts_characters_and_fills_short_rows() {
        let mut t = Table::new(&["NAME", "N"]).right(&["N"]);
        t.row(["été"]);
        t.row(["x", "10"]);
        assert_eq!(t.render(), "NAME   N\nété\nx     10\n");
    }

    #[test]
    fn key_values_line_up() {
        let text = key_values(&[
            ("id", "abc".into()),
            ("vm name", "web".into()),
            ("notes", "one\ntwo".into()),
            ("empty", String::new()),
        ]);
        assert_eq!(
            text,
            "id:      abc\nvm name: web\nnotes:   one\n         two\nempty:\n"
        );
    }
}
