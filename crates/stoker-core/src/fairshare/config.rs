//! The queue file: queues, the rules that map applications to them, who may choose a queue, and
//! the cluster capacity.
//!
//! ```toml
//! default_queue = "adhoc"                     # applications no rule maps ("default" if unset)
//!
//! [capacity]                                  # what stoker admits in all; any of the three
//! cores = 240
//! memory = "960Gi"
//! # executors = 60
//!
//! [[queues]]
//! name = "etl"
//! weight = 2                                  # share of what is left after guarantees (1..)
//! guaranteed = { cores = 96, memory = "384Gi" }   # admitted first when demanded
//! max = { cores = 200 }                       # never more
//! floor = 2                                   # executors each application gets first (default 1)
//! allow = ["system:serviceaccount:etl:*"]     # who may choose it with spark.stoker.queue
//!
//! [[queues]]
//! name = "adhoc"
//! allow = ["*"]
//!
//! [[rules]]
//! namespace = "etl"                           # applications in this namespace
//! queue = "etl"
//!
//! [[rules]]
//! identity = "system:serviceaccount:reports:spark"   # drivers authenticated as this identity
//! queue = "etl"
//! ```
//!
//! Amounts are in the units of a Kubernetes ResourceQuota: whole cores, memory as a quantity
//! (`"960Gi"`, `"512Mi"`, `"1T"`); or in executors. A limit bounds each unit it names and no
//! other. Guarantees must be given in units the capacity names, so that they can be checked
//! against it.
//!
//! # Rules of the file
//!
//! * Every queue name is unique, 1..=63 characters of `[a-z0-9-]` (it appears in metrics and
//!   labels); weights are 1..=10000; amounts are not negative; capacities are at least 1.
//! * A queue's guarantee is at most its max, and the guarantees of all queues add up to at most
//!   the capacity, in every unit.
//! * A rule has exactly one of `namespace` and `identity` and names a defined queue; two rules
//!   for the same namespace or identity are an error. Identity rules are consulted before
//!   namespace rules, then `default_queue`: the order of rules in the file does not matter.
//! * `allow` entries are an identity (`system:serviceaccount:ml:spark`, or any user name), all
//!   ServiceAccounts of a namespace (`system:serviceaccount:ml:*`) or everyone (`*`, including
//!   drivers that are not authenticated). The queue an application is mapped to by the rules is
//!   always allowed to it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

/// Largest capacity, guarantee or maximum accepted in any unit (keeps share arithmetic exact).
pub const MAX_AMOUNT: u64 = 1 << 40;

/// Largest queue weight accepted.
pub const MAX_WEIGHT: u32 = 10_000;

/// Largest per-application floor accepted, in executors.
pub const MAX_FLOOR: u32 = 10_000;

/// The floor of a queue that does not set one: every application with a demand gets an executor
/// before any gets a second, so no running driver is starved to zero.
pub const DEFAULT_FLOOR: u32 = 1;

/// A queue's name: 1..=63 characters of `[a-z0-9-]`, starting and ending with a letter or digit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueName(String);

impl QueueName {
    /// Validates `raw` as a queue name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if raw.is_empty() || raw.len() > 63 {
            return Err(format!("{raw:?} must be 1 to 63 characters long"));
        }
        if !raw.chars().all(valid_char) || raw.starts_with('-') || raw.ends_with('-') {
            return Err(format!(
                "{raw:?} is not a queue name: lower-case letters, digits and '-', starting and \
                 ending with a letter or digit"
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A unit in which capacities, guarantees and maxima are given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unit {
    /// Executors, whatever their size.
    Executors,
    /// Whole cores (`spark.executor.cores` per executor).
    Cores,
    /// Memory in MiB (a container's memory: heap, overhead, off-heap and PySpark).
    MemoryMib,
}

impl Unit {
    /// Every unit, in a fixed order.
    pub const ALL: [Unit; 3] = [Unit::Executors, Unit::Cores, Unit::MemoryMib];

    /// The key in the queue file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Executors => "executors",
            Self::Cores => "cores",
            Self::MemoryMib => "memory",
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An amount in up to three units; a unit left `None` is not bounded (in a limit) or not given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Resources {
    /// Executors.
    pub executors: Option<u64>,
    /// Whole cores.
    pub cores: Option<u64>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
}

impl Resources {
    /// No unit given: as a limit, unbounded.
    pub const UNBOUNDED: Resources = Resources {
        executors: None,
        cores: None,
        memory_mib: None,
    };

    /// `n` executors.
    pub fn executors(n: u64) -> Self {
        Self {
            executors: Some(n),
            ..Self::UNBOUNDED
        }
    }

    /// `cores` cores and `memory_mib` MiB.
    pub fn cores_memory(cores: u64, memory_mib: u64) -> Self {
        Self {
            cores: Some(cores),
            memory_mib: Some(memory_mib),
            ..Self::UNBOUNDED
        }
    }

    /// The amount in `unit`, if given.
    pub fn get(&self, unit: Unit) -> Option<u64> {
        match unit {
            Unit::Executors => self.executors,
            Unit::Cores => self.cores,
            Unit::MemoryMib => self.memory_mib,
        }
    }

    fn slot(&mut self, unit: Unit) -> &mut Option<u64> {
        match unit {
            Unit::Executors => &mut self.executors,
            Unit::Cores => &mut self.cores,
            Unit::MemoryMib => &mut self.memory_mib,
        }
    }

    /// The units given, with their amounts.
    pub fn given(&self) -> impl Iterator<Item = (Unit, u64)> + '_ {
        Unit::ALL
            .into_iter()
            .filter_map(|unit| self.get(unit).map(|amount| (unit, amount)))
    }

    /// Whether no unit is given.
    pub fn is_unbounded(&self) -> bool {
        self.given().next().is_none()
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unbounded() {
            return f.write_str("-");
        }
        let mut first = true;
        for (unit, amount) in self.given() {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            match unit {
                Unit::Executors => write!(f, "{amount} executors")?,
                Unit::Cores => write!(f, "{amount} cores")?,
                Unit::MemoryMib => write!(f, "{amount}Mi")?,
            }
        }
        Ok(())
    }
}

/// One queue, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queue {
    /// Its name.
    pub name: QueueName,
    /// Its weight in the sharing of what is left after guarantees (1..=[`MAX_WEIGHT`]).
    pub weight: u32,
    /// What it is admitted first, when its applications ask for it.
    pub guaranteed: Resources,
    /// What it is never admitted more than.
    pub max: Resources,
    /// Executors each of its applications is admitted before any sharing (raised to the
    /// application's own `spark.dynamicAllocation.minExecutors`, lowered to its request).
    pub floor: u32,
    /// Who may choose it with `spark.stoker.queue` (see the module documentation).
    pub allow: BTreeSet<String>,
}

impl Queue {
    /// A queue with weight 1, no guarantee, no max, the default floor, and no one allowed to
    /// choose it.
    pub fn new(name: QueueName) -> Self {
        Self {
            name,
            weight: 1,
            guaranteed: Resources::UNBOUNDED,
            max: Resources::UNBOUNDED,
            floor: DEFAULT_FLOOR,
            allow: BTreeSet::new(),
        }
    }

    /// Whether `identity` (a driver's user name; `None` when not authenticated) may choose this
    /// queue.
    pub fn allows(&self, identity: Option<&str>) -> bool {
        if self.allow.contains("*") {
            return true;
        }
        let Some(identity) = identity else {
            return false;
        };
        if self.allow.contains(identity) {
            return true;
        }
        // `system:serviceaccount:<ns>:*`: every ServiceAccount of a namespace.
        match identity
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        {
            Some((namespace, _)) => self
                .allow
                .contains(&format!("system:serviceaccount:{namespace}:*")),
            None => false,
        }
    }
}

/// The validated queue configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    capacity: Resources,
    queues: BTreeMap<QueueName, Queue>,
    default_queue: QueueName,
    by_namespace: BTreeMap<String, QueueName>,
    by_identity: BTreeMap<String, QueueName>,
}

/// A mapping rule, before validation against the queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Applications whose executors run in this namespace.
    Namespace {
        /// The namespace.
        namespace: String,
        /// Their queue.
        queue: QueueName,
    },
    /// Drivers authenticated as this identity.
    Identity {
        /// The user name, e.g. `system:serviceaccount:etl:spark`.
        identity: String,
        /// Their queue.
        queue: QueueName,
    },
}

/// Why a queue file was refused. The configuration in force stays as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{field}: {problem}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct ConfigError {
    /// Line in the file (from 1), when the error comes from a file.
    pub line: Option<usize>,
    /// Path of the field, e.g. `queues[1].weight`.
    pub field: String,
    /// What is wrong with it.
    pub problem: ConfigProblem,
}

/// What is wrong with a field of the queue file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    /// The file is not TOML, or a value has the wrong type, or a key is unknown.
    #[error("{0}")]
    Syntax(String),
    /// A negative amount, weight or floor.
    #[error("must not be negative, got {0}")]
    Negative(i64),
    /// A weight of 0.
    #[error("must be at least 1, got 0")]
    Zero,
    /// A value above the largest accepted.
    #[error("{value} is above the largest accepted, {limit}")]
    TooLarge {
        /// The value.
        value: u64,
        /// The largest accepted.
        limit: u64,
    },
    /// A memory quantity that does not parse.
    #[error("{0:?} is not a memory quantity: whole number with Ki, Mi, Gi, Ti, Pi, k, M, G, T, P or no suffix (bytes), e.g. \"64Gi\"")]
    BadQuantity(String),
    /// An invalid queue name.
    #[error("{0}")]
    BadName(String),
    /// A queue defined twice.
    #[error("queue {name:?} is defined twice{}", first_line.map(|l| format!(" (first at line {l})")).unwrap_or_default())]
    DuplicateQueue {
        /// The name.
        name: String,
        /// Where it was first defined.
        first_line: Option<usize>,
    },
    /// A rule or the default names a queue that is not defined.
    #[error("queue {0:?} is not defined")]
    UnknownQueue(String),
    /// A guarantee above the queue's own max.
    #[error("guaranteed {guaranteed} {unit} is above the queue's max of {max}")]
    GuaranteedAboveMax {
        /// The unit.
        unit: Unit,
        /// The guarantee.
        guaranteed: u64,
        /// The max.
        max: u64,
    },
    /// A guarantee in a unit the capacity does not give.
    #[error("is given in {0} but the capacity is not: give guarantees in the capacity's units")]
    GuaranteeUnitNotInCapacity(Unit),
    /// The guarantees add up to more than the capacity.
    #[error(
        "the guarantees of all queues add up to {sum} {unit}, above the capacity of {capacity}"
    )]
    GuaranteesAboveCapacity {
        /// The unit.
        unit: Unit,
        /// Their sum.
        sum: u64,
        /// The capacity.
        capacity: u64,
    },
    /// A rule without, or with both of, `namespace` and `identity`.
    #[error("a rule needs exactly one of `namespace` and `identity`")]
    RuleKind,
    /// Two rules for the same namespace or identity.
    #[error("{key:?} already has a rule{}", first_line.map(|l| format!(" (at line {l})")).unwrap_or_default())]
    DuplicateRule {
        /// The namespace or identity.
        key: String,
        /// Where the first rule is.
        first_line: Option<usize>,
    },
    /// An empty string where a name is needed, or a bad `allow` pattern.
    #[error("{0}")]
    BadValue(String),
}

impl ConfigError {
    fn new(line: Option<usize>, field: impl Into<String>, problem: ConfigProblem) -> Self {
        Self {
            line,
            field: field.into(),
            problem,
        }
    }
}

/// Why an application cannot have the queue it asked for (`spark.stoker.queue`). Refused at
/// registration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such queue.
    #[error("spark.stoker.queue: queue {queue:?} does not exist")]
    UnknownQueue {
        /// The queue asked for.
        queue: String,
    },
    /// The identity may not use the queue.
    #[error("spark.stoker.queue: {identity} may not use queue {queue:?}")]
    NotAllowed {
        /// The queue asked for.
        queue: String,
        /// Who asked (`unauthenticated driver` without authentication).
        identity: String,
    },
}

impl QueueConfig {
    /// Validates a configuration built in code (the file's rules, without lines).
    pub fn new(
        capacity: Resources,
        queues: Vec<Queue>,
        default_queue: QueueName,
        rules: Vec<Rule>,
    ) -> Result<Self, ConfigError> {
        let mut builder = Builder::default();
        for (unit, amount) in capacity.given() {
            builder.capacity(None, unit, amount)?;
        }
        for (i, queue) in queues.into_iter().enumerate() {
            builder.queue(i, None, queue)?;
        }
        for (i, rule) in rules.into_iter().enumerate() {
            builder.rule(i, None, rule)?;
        }
        builder.finish(default_queue, None)
    }

    /// Parses and validates a queue file (TOML, see the module documentation). The error names
    /// the line, the field and what is wrong.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| line_of(text, &span));
            ConfigError::new(
                line,
                "queue file",
                ConfigProblem::Syntax(e.message().to_owned()),
            )
        })?;
        let at = |span: Range<usize>| Some(line_of(text, &span));
        let mut builder = Builder::default();
        if let Some(capacity) = &raw.capacity {
            let resources = resources(text, "capacity", capacity.get_ref())?;
            for (unit, amount) in resources.given() {
                let line = capacity.get_ref().line_of(text, unit);
                builder.capacity(line, unit, amount)?;
            }
        }
        for (i, raw_queue) in raw.queues.iter().enumerate() {
            let line = at(raw_queue.span());
            let queue = raw_queue.get_ref().validate(text, i)?;
            builder.queue(i, line, queue)?;
        }
        for (i, raw_rule) in raw.rules.iter().enumerate() {
            let line = at(raw_rule.span());
            let rule = raw_rule.get_ref().validate(text, i)?;
            builder.rule(i, line, rule)?;
        }
        let (default_queue, line) = match &raw.default_queue {
            Some(name) => {
                let line = at(name.span());
                let parsed = QueueName::parse(name.get_ref()).map_err(|problem| {
                    ConfigError::new(line, "default_queue", ConfigProblem::BadName(problem))
                })?;
                (parsed, line)
            }
            None => (QueueName("default".to_owned()), None),
        };
        builder.finish(default_queue, line)
    }

    /// What stoker admits in all.
    pub fn capacity(&self) -> &Resources {
        &self.capacity
    }

    /// The queues by name.
    pub fn queues(&self) -> &BTreeMap<QueueName, Queue> {
        &self.queues
    }

    /// One queue.
    pub fn queue(&self, name: &QueueName) -> Option<&Queue> {
        self.queues.get(name)
    }

    /// The queue of applications that no rule maps.
    pub fn default_queue(&self) -> &QueueName {
        &self.default_queue
    }

    /// The queue the rules map an application to: by identity, then by namespace, then the
    /// default queue.
    pub fn mapped_queue(&self, namespace: &str, identity: Option<&str>) -> &QueueName {
        identity
            .and_then(|identity| self.by_identity.get(identity))
            .or_else(|| self.by_namespace.get(namespace))
            .unwrap_or(&self.default_queue)
    }
}

/// The queue of an application: the one it asked for with `spark.stoker.queue` (`requested`,
/// empty or `None` for none) if it exists and its identity may use it (or the rules map it
/// there), else a refusal naming the queue; without a request, the one the rules map it to.
/// `identity` is the driver's authenticated user name, `None` without authentication.
pub fn queue_for(
    config: &QueueConfig,
    namespace: &str,
    identity: Option<&str>,
    requested: Option<&str>,
) -> Result<QueueName, Refusal> {
    let mapped = config.mapped_queue(namespace, identity);
    let Some(requested) = requested.filter(|r| !r.is_empty()) else {
        return Ok(mapped.clone());
    };
    let Some(queue) = config
        .queues
        .values()
        .find(|queue| queue.name.as_str() == requested)
    else {
        return Err(Refusal::UnknownQueue {
            queue: requested.to_owned(),
        });
    };
    if &queue.name == mapped || queue.allows(identity) {
        return Ok(queue.name.clone());
    }
    Err(Refusal::NotAllowed {
        queue: requested.to_owned(),
        identity: identity.unwrap_or("unauthenticated driver").to_owned(),
    })
}

// === validation shared by files and code ===

#[derive(Default)]
struct Builder {
    capacity: Resources,
    queues: BTreeMap<QueueName, (Queue, Option<usize>, usize)>,
    by_namespace: BTreeMap<String, (QueueName, Option<usize>)>,
    by_identity: BTreeMap<String, (QueueName, Option<usize>)>,
    rule_lines: Vec<(usize, Option<usize>, QueueName)>,
}

impl Builder {
    fn capacity(
        &mut self,
        line: Option<usize>,
        unit: Unit,
        amount: u64,
    ) -> Result<(), ConfigError> {
        let field = format!("capacity.{unit}");
        check_amount(line, &field, amount)?;
        if amount == 0 {
            return Err(ConfigError::new(line, field, ConfigProblem::Zero));
        }
        *self.capacity.slot(unit) = Some(amount);
        Ok(())
    }

    fn queue(&mut self, i: usize, line: Option<usize>, queue: Queue) -> Result<(), ConfigError> {
        let field = |name: &str| format!("queues[{i}].{name}");
        QueueName::parse(queue.name.as_str())
            .map_err(|p| ConfigError::new(line, field("name"), ConfigProblem::BadName(p)))?;
        if let Some((_, first_line, _)) = self.queues.get(&queue.name) {
            let problem = ConfigProblem::DuplicateQueue {
                name: queue.name.to_string(),
                first_line: *first_line,
            };
            return Err(ConfigError::new(line, field("name"), problem));
        }
        if queue.weight == 0 {
            return Err(ConfigError::new(line, field("weight"), ConfigProblem::Zero));
        }
        if queue.weight > MAX_WEIGHT {
            let problem = ConfigProblem::TooLarge {
                value: u64::from(queue.weight),
                limit: u64::from(MAX_WEIGHT),
            };
            return Err(ConfigError::new(line, field("weight"), problem));
        }
        if queue.floor > MAX_FLOOR {
            let problem = ConfigProblem::TooLarge {
                value: u64::from(queue.floor),
                limit: u64::from(MAX_FLOOR),
            };
            return Err(ConfigError::new(line, field("floor"), problem));
        }
        for (unit, amount) in queue.guaranteed.given() {
            check_amount(line, &format!("queues[{i}].guaranteed.{unit}"), amount)?;
        }
        for (unit, amount) in queue.max.given() {
            check_amount(line, &format!("queues[{i}].max.{unit}"), amount)?;
        }
        for (unit, guaranteed) in queue.guaranteed.given() {
            if let Some(max) = queue.max.get(unit) {
                if guaranteed > max {
                    let problem = ConfigProblem::GuaranteedAboveMax {
                        unit,
                        guaranteed,
                        max,
                    };
                    return Err(ConfigError::new(line, field("guaranteed"), problem));
                }
            }
        }
        for pattern in &queue.allow {
            check_allow(pattern)
                .map_err(|p| ConfigError::new(line, field("allow"), ConfigProblem::BadValue(p)))?;
        }
        self.queues.insert(queue.name.clone(), (queue, line, i));
        Ok(())
    }

    fn rule(&mut self, i: usize, line: Option<usize>, rule: Rule) -> Result<(), ConfigError> {
        let (map, key, queue, name) = match rule {
            Rule::Namespace { namespace, queue } => {
                (&mut self.by_namespace, namespace, queue, "namespace")
            }
            Rule::Identity { identity, queue } => {
                (&mut self.by_identity, identity, queue, "identity")
            }
        };
        let field = format!("rules[{i}].{name}");
        if key.is_empty() {
            let problem = ConfigProblem::BadValue("must not be empty".to_owned());
            return Err(ConfigError::new(line, field, problem));
        }
        if let Some((_, first_line)) = map.get(&key) {
            let problem = ConfigProblem::DuplicateRule {
                key,
                first_line: *first_line,
            };
            return Err(ConfigError::new(line, field, problem));
        }
        map.insert(key, (queue.clone(), line));
        self.rule_lines.push((i, line, queue));
        Ok(())
    }

    fn finish(
        self,
        default_queue: QueueName,
        default_line: Option<usize>,
    ) -> Result<QueueConfig, ConfigError> {
        for (i, line, queue) in &self.rule_lines {
            if !self.queues.contains_key(queue) {
                let problem = ConfigProblem::UnknownQueue(queue.to_string());
                return Err(ConfigError::new(
                    *line,
                    format!("rules[{i}].queue"),
                    problem,
                ));
            }
        }
        if !self.queues.contains_key(&default_queue) {
            let problem = ConfigProblem::UnknownQueue(default_queue.to_string());
            return Err(ConfigError::new(default_line, "default_queue", problem));
        }
        // Guarantees: in the capacity's units, and all of them within it. Queues in file order,
        // so that the error names the first queue that breaks the rule.
        let mut in_order: Vec<&(Queue, Option<usize>, usize)> = self.queues.values().collect();
        in_order.sort_by_key(|(_, _, i)| *i);
        let mut sums = [0u64; 3];
        for (queue, line, i) in in_order {
            for (unit, guaranteed) in queue.guaranteed.given() {
                let field = format!("queues[{i}].guaranteed.{unit}");
                let Some(capacity) = self.capacity.get(unit) else {
                    if self.capacity.is_unbounded() {
                        // No capacity: nothing to share, a guarantee is always met.
                        continue;
                    }
                    let problem = ConfigProblem::GuaranteeUnitNotInCapacity(unit);
                    return Err(ConfigError::new(*line, field, problem));
                };
                let sum = &mut sums[unit as usize];
                *sum = sum.saturating_add(guaranteed);
                if *sum > capacity {
                    let problem = ConfigProblem::GuaranteesAboveCapacity {
                        unit,
                        sum: *sum,
                        capacity,
                    };
                    return Err(ConfigError::new(*line, field, problem));
                }
            }
        }
        Ok(QueueConfig {
            capacity: self.capacity,
            queues: self
                .queues
                .into_iter()
                .map(|(name, (queue, _, _))| (name, queue))
                .collect(),
            default_queue,
            by_namespace: self
                .by_namespace
                .into_iter()
                .map(|(k, (q, _))| (k, q))
                .collect(),
            by_identity: self
                .by_identity
                .into_iter()
                .map(|(k, (q, _))| (k, q))
                .collect(),
        })
    }
}

fn check_amount(line: Option<usize>, field: &str, amount: u64) -> Result<(), ConfigError> {
    if amount > MAX_AMOUNT {
        let problem = ConfigProblem::TooLarge {
            value: amount,
            limit: MAX_AMOUNT,
        };
        return Err(ConfigError::new(line, field, problem));
    }
    Ok(())
}

fn check_allow(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("an empty entry allows no one; use \"*\" for everyone".to_owned());
    }
    if pattern == "*" || !pattern.contains('*') {
        return Ok(());
    }
    let namespace_wide = pattern
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.strip_suffix(":*"))
        .is_some_and(|ns| !ns.is_empty() && !ns.contains(':') && !ns.contains('*'));
    if namespace_wide {
        return Ok(());
    }
    Err(format!(
        "{pattern:?}: '*' is allowed alone or as system:serviceaccount:<namespace>:*"
    ))
}

/// Memory quantity → MiB, rounded down. Whole numbers only.
pub fn parse_memory_mib(raw: &str) -> Option<u64> {
    let digits_end = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, suffix) = raw.split_at(digits_end);
    if digits.is_empty() {
        return None;
    }
    let value: u128 = digits.parse().ok()?;
    let bytes_per: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        _ => return None,
    };
    let mib = value.checked_mul(bytes_per)? >> 20;
    u64::try_from(mib).ok()
}

fn line_of(text: &str, span: &Range<usize>) -> usize {
    let end = span.start.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

// === the file as written ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    capacity: Option<Spanned<RawResources>>,
    default_queue: Option<Spanned<String>>,
    #[serde(default)]
    queues: Vec<Spanned<RawQueue>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    executors: Option<Spanned<i64>>,
    cores: Option<Spanned<i64>>,
    memory: Option<Spanned<String>>,
}

impl RawResources {
    fn line_of(&self, text: &str, unit: Unit) -> Option<usize> {
        let span = match unit {
            Unit::Executors => self.executors.as_ref().map(Spanned::span),
            Unit::Cores => self.cores.as_ref().map(Spanned::span),
            Unit::MemoryMib => self.memory.as_ref().map(Spanned::span),
        };
        span.map(|span| line_of(text, &span))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    name: Spanned<String>,
    weight: Option<Spanned<i64>>,
    guaranteed: Option<Spanned<RawResources>>,
    max: Option<Spanned<RawResources>>,
    floor: Option<Spanned<i64>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    namespace: Option<Spanned<String>>,
    identity: Option<Spanned<String>>,
    queue: Spanned<String>,
}

fn non_negative(text: &str, field: &str, value: &Spanned<i64>) -> Result<u64, ConfigError> {
    u64::try_from(*value.get_ref()).map_err(|_| {
        let line = Some(line_of(text, &value.span()));
        ConfigError::new(line, field, ConfigProblem::Negative(*value.get_ref()))
    })
}

fn bounded_u32(
    text: &str,
    field: &str,
    value: &Spanned<i64>,
    limit: u32,
) -> Result<u32, ConfigError> {
    let raw = non_negative(text, field, value)?;
    u32::try_from(raw)
        .ok()
        .filter(|&v| v <= limit)
        .ok_or_else(|| {
            let line = Some(line_of(text, &value.span()));
            let problem = ConfigProblem::TooLarge {
                value: raw,
                limit: u64::from(limit),
            };
            ConfigError::new(line, field, problem)
        })
}

fn resources(text: &str, field: &str, raw: &RawResources) -> Result<Resources, ConfigError> {
    let mut out = Resources::UNBOUNDED;
    if let Some(executors) = &raw.executors {
        out.executors = Some(non_negative(
            text,
            &format!("{field}.executors"),
            executors,
        )?);
    }
    if let Some(cores) = &raw.cores {
        out.cores = Some(non_negative(text, &format!("{field}.cores"), cores)?);
    }
    if let Some(memory) = &raw.memory {
        let mib = parse_memory_mib(memory.get_ref()).ok_or_else(|| {
            let line = Some(line_of(text, &memory.span()));
            let problem = ConfigProblem::BadQuantity(memory.get_ref().clone());
            ConfigError::new(line, format!("{field}.memory"), problem)
        })?;
        out.memory_mib = Some(mib);
    }
    for (unit, amount) in out.given() {
        let line = raw.line_of(text, unit);
        check_amount(line, &format!("{field}.{unit}"), amount)?;
    }
    Ok(out)
}

impl RawQueue {
    fn validate(&self, text: &str, i: usize) -> Result<Queue, ConfigError> {
        let field = |name: &str| format!("queues[{i}].{name}");
        let line = |span: Range<usize>| Some(line_of(text, &span));
        let name = QueueName::parse(self.name.get_ref()).map_err(|p| {
            ConfigError::new(
                line(self.name.span()),
                field("name"),
                ConfigProblem::BadName(p),
            )
        })?;
        let mut queue = Queue::new(name);
        if let Some(weight) = &self.weight {
            if *weight.get_ref() == 0 {
                return Err(ConfigError::new(
                    line(weight.span()),
                    field("weight"),
                    ConfigProblem::Zero,
                ));
            }
            queue.weight = bounded_u32(text, &field("weight"), weight, MAX_WEIGHT)?;
        }
        if let Some(floor) = &self.floor {
            queue.floor = bounded_u32(text, &field("floor"), floor, MAX_FLOOR)?;
        }
        if let Some(guaranteed) = &self.guaranteed {
            queue.guaranteed = resources(text, &field("guaranteed"), guaranteed.get_ref())?;
        }
        if let Some(max) = &self.max {
            queue.max = resources(text, &field("max"), max.get_ref())?;
        }
        for pattern in &self.allow {
            check_allow(pattern.get_ref()).map_err(|p| {
                ConfigError::new(
                    line(pattern.span()),
                    field("allow"),
                    ConfigProblem::BadValue(p),
                )
            })?;
            queue.allow.insert(pattern.get_ref().clone());
        }
        Ok(queue)
    }
}

impl RawRule {
    fn validate(&self, text: &str, i: usize) -> Result<Rule, ConfigError> {
        let queue_line = Some(line_of(text, &self.queue.span()));
        let queue = QueueName::parse(self.queue.get_ref()).map_err(|p| {
            ConfigError::new(
                queue_line,
                format!("rules[{i}].queue"),
                ConfigProblem::BadName(p),
            )
        })?;
        match (&self.namespace, &self.identity) {
            (Some(namespace), None) => Ok(Rule::Namespace {
                namespace: namespace.get_ref().clone(),
                queue,
            }),
            (None, Some(identity)) => Ok(Rule::Identity {
                identity: identity.get_ref().clone(),
                queue,
            }),
            _ => Err(ConfigError::new(
                queue_line,
                format!("rules[{i}]"),
                ConfigProblem::RuleKind,
            )),
        }
    }
}
