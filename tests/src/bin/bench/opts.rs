//! Command-line options.

use anyhow::{Result, anyhow, bail};

#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) iterations: usize,
    pub(crate) svids: usize,
    pub(crate) batch: usize,
    pub(crate) concurrency: usize,
    pub(crate) floor_threads: usize,
    pub(crate) sign_entries: usize,
    pub(crate) push_trials: usize,
    pub(crate) start_trials: usize,
    pub(crate) scale_entries: usize,
    /// Measurements to run (1-5); empty = all.
    pub(crate) only: Vec<u32>,
    pub(crate) json: bool,
    /// `--help`: print the usage and do nothing else.
    pub(crate) help: bool,
}

pub(crate) const USAGE: &str =
    "lanyard-bench [--json] [--iterations N (500)] [--svids N (4000)] [--batch N (100)]
              [--concurrency N (4)] [--floor-threads N (2)] [--entries N (200)]
              [--push-trials N (20)] [--start-trials N (10)] [--scale-entries N (20000)]
              [--only 1,2,3,4,5]";

impl Opts {
    pub(crate) fn parse() -> Result<Opts> {
        let mut o = Opts {
            iterations: 500,
            svids: 4000,
            batch: 100,
            concurrency: 4,
            floor_threads: 2,
            sign_entries: 200,
            push_trials: 20,
            start_trials: 10,
            scale_entries: 20_000,
            only: vec![],
            json: false,
            help: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut num = |name: &str| -> Result<usize> {
                let v = args
                    .next()
                    .ok_or_else(|| anyhow!("{name} needs a value\n{USAGE}"))?;
                let n: usize = v
                    .parse()
                    .map_err(|_| anyhow!("{name} {v:?} is not a number\n{USAGE}"))?;
                if n == 0 {
                    bail!("{name} must be at least 1");
                }
                Ok(n)
            };
            match a.as_str() {
                "--json" => o.json = true,
                "--iterations" => o.iterations = num(&a)?,
                "--svids" => o.svids = num(&a)?,
                "--batch" => o.batch = num(&a)?,
                "--concurrency" => o.concurrency = num(&a)?,
                "--floor-threads" => o.floor_threads = num(&a)?,
                "--entries" => o.sign_entries = num(&a)?,
                "--push-trials" => o.push_trials = num(&a)?,
                "--start-trials" => o.start_trials = num(&a)?,
                "--scale-entries" => o.scale_entries = num(&a)?,
                "--only" => {
                    let v = args
                        .next()
                        .ok_or_else(|| anyhow!("--only needs a list like 1,3\n{USAGE}"))?;
                    o.only = v
                        .split(',')
                        .map(|x| x.trim().parse().ok().filter(|n| (1..=5).contains(n)))
                        .collect::<Option<_>>()
                        .ok_or_else(|| {
                            anyhow!("--only {v:?}: expected numbers 1-5 separated by commas")
                        })?;
                }
                "-h" | "--help" => {
                    o.help = true;
                    return Ok(o);
                }
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        Ok(o)
    }
}
