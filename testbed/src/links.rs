//! The cross-region links of a long-running testbed (`testbed/testbed up`, in containers or as local
//! processes): one [`Relay`] per (client region, server) pair on fixed addresses, and a line-based control
//! port through which the chaos commands cut a region off, restore it, or change the distance between two
//! regions while traffic flows.
//!
//! Control protocol: one command per line, one answer line (`ok ...` or `error ...`); `status` answers one
//! line per link, then `ok`.
//!
//! ```text
//! status                 every link: from, to, listen, target, one-way delay in ms, cut or up
//! cut REGION             every link from or to REGION: open connections reset, new ones refused
//! restore REGION         undo `cut REGION`
//! delay A B MS           one-way delay of every link between regions A and B (both directions)
//! reset                  every link restored, with the delay it started with
//! ```

use crate::Relay;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::str::FromStr;
use std::time::Duration;

/// One link: clients in region `from` reach a server in region `to` at `listen`; bytes go on to `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSpec {
    pub from: String,
    pub to: String,
    pub listen: SocketAddr,
    pub target: SocketAddr,
    pub one_way: Duration,
}

impl FromStr for LinkSpec {
    type Err = anyhow::Error;

    /// `from=eu-west,to=us-east,listen=127.0.0.1:17020,target=127.0.0.1:15432,delay=40ms`
    fn from_str(text: &str) -> Result<LinkSpec> {
        let (mut from, mut to, mut listen, mut target, mut one_way) =
            (None, None, None, None, None);
        for part in text.split(',') {
            let (key, value) = part
                .split_once('=')
                .with_context(|| format!("link {text:?}: {part:?} is not key=value"))?;
            match key.trim() {
                "from" => from = Some(value.trim().to_string()),
                "to" => to = Some(value.trim().to_string()),
                "listen" => listen = Some(parse_addr(value)?),
                "target" => target = Some(parse_addr(value)?),
                "delay" => one_way = Some(parse_millis(value)?),
                other => bail!("link {text:?}: unknown key {other:?}"),
            }
        }
        let missing = |what: &str| anyhow::anyhow!("link {text:?}: {what}= is missing");
        Ok(LinkSpec {
            from: from.ok_or_else(|| missing("from"))?,
            to: to.ok_or_else(|| missing("to"))?,
            listen: listen.ok_or_else(|| missing("listen"))?,
            target: target.ok_or_else(|| missing("target"))?,
            one_way: one_way.unwrap_or(Duration::ZERO),
        })
    }
}

fn parse_addr(text: &str) -> Result<SocketAddr> {
    text.trim()
        .parse()
        .with_context(|| format!("{text:?} is not an address like 127.0.0.1:17020"))
}

/// `40ms`, `1s` or a bare number of milliseconds.
fn parse_millis(text: &str) -> Result<Duration> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000)
    } else {
        (text, 1)
    };
    let n: u64 = number
        .trim()
        .parse()
        .with_context(|| format!("{text:?} is not a delay like 40ms or 1s"))?;
    Ok(Duration::from_millis(n * scale))
}

/// A control command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Status,
    Cut(String),
    Restore(String),
    Delay {
        a: String,
        b: String,
        one_way: Duration,
    },
    Reset,
}

impl FromStr for Command {
    type Err = anyhow::Error;

    fn from_str(line: &str) -> Result<Command> {
        let words: Vec<&str> = line.split_whitespace().collect();
        Ok(match words.as_slice() {
            ["status"] => Command::Status,
            ["cut", region] => Command::Cut(region.to_string()),
            ["restore", region] => Command::Restore(region.to_string()),
            ["delay", a, b, ms] => Command::Delay {
                a: a.to_string(),
                b: b.to_string(),
                one_way: parse_millis(ms)?,
            },
            ["reset"] => Command::Reset,
            _ => bail!(
                "unknown command {line:?} (status | cut REGION | restore REGION | delay A B MS | reset)"
            ),
        })
    }
}

/// Running links.
pub struct Links {
    links: Vec<(LinkSpec, Relay)>,
}

impl Links {
    /// Binds every link; fails if any address is taken.
    pub fn start(specs: Vec<LinkSpec>) -> Result<Links> {
        let mut links = Vec::new();
        for spec in specs {
            let relay = Relay::bind(spec.listen, spec.target, spec.one_way)?;
            links.push((spec, relay));
        }
        Ok(Links { links })
    }

    /// Carries out a command and returns the answer's lines (the last one starts with `ok`).
    pub fn apply(&self, command: &Command) -> Result<Vec<String>> {
        let touching = |region: &str| {
            self.links
                .iter()
                .filter(move |(spec, _)| spec.from == region || spec.to == region)
                .collect::<Vec<_>>()
        };
        match command {
            Command::Status => {
                let mut lines: Vec<String> = self
                    .links
                    .iter()
                    .map(|(spec, relay)| {
                        format!(
                            "{} {} {} {} {} {}",
                            spec.from,
                            spec.to,
                            spec.listen,
                            relay.target(),
                            relay.delay().as_millis(),
                            if relay.is_cut() { "cut" } else { "up" }
                        )
                    })
                    .collect();
                lines.push("ok".into());
                Ok(lines)
            }
            Command::Cut(region) | Command::Restore(region) => {
                let links = touching(region);
                if links.is_empty() {
                    bail!("no link from or to region {region}");
                }
                for (_, relay) in &links {
                    if matches!(command, Command::Cut(_)) {
                        relay.cut();
                    } else {
                        relay.restore();
                    }
                }
                Ok(vec![format!("ok {} links", links.len())])
            }
            Command::Delay { a, b, one_way } => {
                let mut n = 0;
                for (spec, relay) in &self.links {
                    if (&spec.from == a && &spec.to == b) || (&spec.from == b && &spec.to == a) {
                        relay.set_delay(*one_way);
                        n += 1;
                    }
                }
                if n == 0 {
                    bail!("no link between {a} and {b}");
                }
                Ok(vec![format!("ok {n} links")])
            }
            Command::Reset => {
                for (spec, relay) in &self.links {
                    relay.restore();
                    relay.set_delay(spec.one_way);
                }
                Ok(vec![format!("ok {} links", self.links.len())])
            }
        }
    }

    /// Serves the control protocol on `listener` until the process ends; one client at a time, which is all
    /// the chaos commands need.
    pub fn serve_control(&self, listener: TcpListener) {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            // A client that vanished mid-command is no failure of the relay.
            let _ = self.answer(stream);
        }
    }

    fn answer(&self, stream: TcpStream) -> std::io::Result<()> {
        let mut writer = stream.try_clone()?;
        for line in BufReader::new(stream).lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let answer = line
                .parse::<Command>()
                .and_then(|command| self.apply(&command));
            match answer {
                Ok(lines) => {
                    for l in lines {
                        writeln!(writer, "{l}")?;
                    }
                }
                Err(e) => writeln!(writer, "error {e:#}")?,
            }
        }
        Ok(())
    }
}

/// Sends one command to a control port and returns the answer (every line up to the final `ok`/`error`).
pub fn control(addr: SocketAddr, command: &str) -> Result<String> {
    let stream = TcpStream::connect(addr)
        .with_context(|| format!("connecting to the relay's control port {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    writeln!(writer, "{}", command.trim())?;
    let mut answer = String::new();
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let last = line.starts_with("ok") || line.starts_with("error");
        answer.push_str(&line);
        answer.push('\n');
        if last {
            if line.starts_with("error") {
                bail!("{}", line.trim_start_matches("error ").trim());
            }
            return Ok(answer);
        }
    }
    bail!("the relay closed the control connection without answering")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_specs_parse_with_units_and_name_what_is_wrong() {
        let spec: LinkSpec =
            "from=eu-west,to=us-east,listen=127.0.0.1:17020,target=127.0.0.1:15432,delay=40ms"
                .parse()
                .unwrap();
        assert_eq!(spec.from, "eu-west");
        assert_eq!(spec.listen.port(), 17020);
        assert_eq!(spec.one_way, Duration::from_millis(40));
        let spec: LinkSpec = "from=a,to=b,listen=127.0.0.1:1,target=127.0.0.1:2,delay=1s"
            .parse()
            .unwrap();
        assert_eq!(spec.one_way, Duration::from_secs(1));
        let err = "from=a,listen=127.0.0.1:1,target=127.0.0.1:2"
            .parse::<LinkSpec>()
            .unwrap_err();
        assert!(err.to_string().contains("to= is missing"), "{err}");
        assert!("from=a,to=b,listen=x,target=127.0.0.1:2"
            .parse::<LinkSpec>()
            .is_err());
    }

    #[test]
    fn control_commands_parse_and_unknown_ones_list_the_valid_ones() {
        assert_eq!("status".parse::<Command>().unwrap(), Command::Status);
        assert_eq!(
            " cut  eu-west ".parse::<Command>().unwrap(),
            Command::Cut("eu-west".into())
        );
        assert_eq!(
            "delay us-east eu-west 250".parse::<Command>().unwrap(),
            Command::Delay {
                a: "us-east".into(),
                b: "eu-west".into(),
                one_way: Duration::from_millis(250)
            }
        );
        let err = "explode".parse::<Command>().unwrap_err().to_string();
        assert!(err.contains("cut REGION"), "{err}");
    }

    #[test]
    fn cutting_a_region_refuses_its_links_and_restoring_brings_them_back() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in echo.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut &s, &mut w);
                });
            }
        });
        let listen = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let specs = vec![
            LinkSpec {
                from: "eu-west".into(),
                to: "us-east".into(),
                listen: listen(crate::free_port().unwrap()),
                target,
                one_way: Duration::from_millis(5),
            },
            LinkSpec {
                from: "ap-south".into(),
                to: "us-east".into(),
                listen: listen(crate::free_port().unwrap()),
                target,
                one_way: Duration::from_millis(5),
            },
        ];
        let links = Links::start(specs.clone()).unwrap();
        let control_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let control_addr = control_listener.local_addr().unwrap();
        let links = std::sync::Arc::new(links);
        let served = links.clone();
        std::thread::spawn(move || served.serve_control(control_listener));

        let round_trip = |addr: SocketAddr| -> bool {
            use std::io::Read;
            let Ok(mut s) = TcpStream::connect(addr) else {
                return false;
            };
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            if s.write_all(b"ping").is_err() {
                return false;
            }
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).is_ok() && &buf == b"ping"
        };
        assert!(round_trip(specs[0].listen));
        assert_eq!(
            control(control_addr, "cut eu-west").unwrap(),
            "ok 1 links\n"
        );
        assert!(!round_trip(specs[0].listen), "a cut link carried bytes");
        assert!(round_trip(specs[1].listen), "cutting eu-west cut ap-south");
        let status = control(control_addr, "status").unwrap();
        assert!(
            status.lines().next().unwrap().ends_with(" 5 cut"),
            "{status}"
        );
        control(control_addr, "delay us-east eu-west 30").unwrap();
        control(control_addr, "restore eu-west").unwrap();
        assert!(round_trip(specs[0].listen));
        let err = control(control_addr, "cut mars").unwrap_err().to_string();
        assert!(err.contains("no link from or to region mars"), "{err}");
        control(control_addr, "reset").unwrap();
        assert!(control(control_addr, "status")
            .unwrap()
            .lines()
            .all(|l| l == "ok" || l.ends_with(" 5 up")));
    }
}
