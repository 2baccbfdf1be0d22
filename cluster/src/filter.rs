//! Payload filter expressions.
//!
//! A filter is a boolean expression over a row's payload fields and its primary key `id`. It
//! selects the rows that Search, Query, Delete and Count act on:
//!
//! ```text
//! price < 9.5 and (category == "books" or category in ["comics", "manga"]) and not archived
//! id in [17, 42, 99]
//! ```
//!
//! # Language
//!
//! - **Comparisons**: `field == literal`, `!=`, `<`, `<=`, `>`, `>=`. The literal may also be
//!   written first (`3 < price`). Exactly one side is a field and the other a literal.
//! - **Membership**: `field in [lit, lit, ...]` and `field not in [...]`. An empty list is allowed
//!   (`in []` matches nothing). A trailing comma is accepted.
//! - **Boolean logic**: `and` / `&&`, `or` / `||`, `not` / `!`, and parentheses. `not` binds
//!   tighter than `and`, which binds tighter than `or`: `a or b and not c` is `a or (b and (not c))`.
//!   A `Bool` field on its own is a condition (`is_active`, `not is_active`), and so are `true`
//!   and `false`.
//! - **Literals**: integers (`42`, `-7`), floats (`1.5`, `-2e3`, `1.5e-3`), `true` / `false`,
//!   and strings in single or double quotes with the escapes `\\`, `\"`, `\'`, `\n` and `\t`.
//! - **Names**: fields are `[A-Za-z_$][A-Za-z0-9_]*`, case-sensitive; `id` (or the schema's
//!   primary field name, see [`Scope`]) is the primary key (Int64). The keywords `and`, `or`,
//!   `not`, `in`, `like`, `true`, `false` are case-insensitive.
//! - **Patterns**: `field like "pre%"` on a string: `%` matches any run of characters, `_` any
//!   one character, `\\%` and `\\_` themselves.
//! - **JSON**: a Json field is reached into with keys and indices, `meta["color"]`,
//!   `meta["sizes"][0]`, and the value found there compares like a literal of its own type (a
//!   number, string or bool; anything else, or nothing, is unset). With a dynamic schema, a name
//!   the schema does not declare is a key of the row's dynamic fields (`$meta["name"]`).
//! - **Functions** (`json_contains(...)` and the like) are not supported, and are refused by name.
//!
//! # Types
//!
//! Filters are type-checked against the collection schema when compiled. Int64 and Float64
//! compare with each other numerically and exactly (`qty < 2.5` is fine, and integers beyond
//! 2^53 are not rounded). Strings compare only with strings; `<` etc. order them by Unicode code
//! point. Bool fields allow only `==` and `!=`. Float comparisons follow IEEE 754 (`-0.0 == 0.0`).
//!
//! # Unset fields (null)
//!
//! A comparison or membership test on an unset field is **false**, whatever the operator: with
//! `tag` unset, `tag == "a"`, `tag != "a"`, `tag in ["a"]` and `tag not in ["a"]` are all false,
//! and a Bool field used alone is false. `not` is plain boolean negation of its operand's result,
//! so `not (tag == "a")` **is** true on such a row. To select rows where `tag` differs from "a"
//! *or* is unset, write `not (tag == "a")`; to require it be set, write `tag != "a"`.
//!
//! # Limits
//!
//! An expression is at most 65536 bytes, both as written and in its canonical form (the form
//! shown in logs, which spells operators out), and parentheses nest at most 64 deep.
//! Syntax errors report a 1-based column, counted in characters from the start of the text.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::fmt::{self, Write as _};

/// The longest filter text accepted, in bytes.
pub const MAX_FILTER_LEN: usize = 65_536;
/// The deepest nesting of parentheses accepted.
pub const MAX_FILTER_DEPTH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ScalarType {
    Int64,
    Float64,
    Bool,
    String,
    Json,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Scalar {
    Int64(i64),
    Float64(f64),
    Bool(bool),
    String(String),
    /// A JSON document; boxed so that the common scalars keep `Scalar` small.
    Json(Box<serde_json::Value>),
}

impl Scalar {
    pub fn scalar_type(&self) -> ScalarType {
        match self {
            Scalar::Int64(_) => ScalarType::Int64,
            Scalar::Float64(_) => ScalarType::Float64,
            Scalar::Bool(_) => ScalarType::Bool,
            Scalar::String(_) => ScalarType::String,
            Scalar::Json(_) => ScalarType::Json,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FieldDef {
    pub name: String,
    pub ty: ScalarType,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FilterError {
    #[error("filter syntax error at column {column}: {message}")]
    Syntax { column: usize, message: String },
    #[error("unknown payload field {0:?} in filter")]
    UnknownField(String),
    #[error("type mismatch in filter: {0}")]
    Type(String),
    #[error("filter too long: {0} bytes, limit 65536")]
    TooLong(usize),
    #[error("filter nested too deeply (limit 64)")]
    TooDeep,
    #[error("{0} is not supported in filters")]
    Unsupported(String),
}

/// What names mean in a filter: the payload fields, the primary key's name, and whether names
/// the schema does not declare are dynamic fields.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub fields: &'a [FieldDef],
    /// The primary key's name (`id` unless the schema names it otherwise).
    pub primary: &'a str,
    /// The Json field that holds each row's undeclared fields (`$meta`), when the schema is
    /// dynamic: an unknown name `x` then means `$meta["x"]`.
    pub dynamic: Option<usize>,
}

/// The name of the hidden Json field that holds a dynamic schema's undeclared fields.
pub const DYNAMIC_FIELD: &str = "$meta";

/// A compiled filter. Cheap to evaluate; `Send + Sync + Clone`.
///
/// `Display` prints the canonical form: keywords spelled out, the field on the left of every
/// comparison, redundant parentheses and double negations dropped, strings double-quoted.
#[derive(Debug, Clone)]
pub struct Filter {
    root: Node,
}

impl Filter {
    /// Parses and type-checks `expr` against `fields`. The pseudo-field `id` (Int64) is the
    /// primary key and shadows any payload field of that name (schemas reserve it anyway).
    pub fn compile(expr: &str, fields: &[FieldDef]) -> Result<Filter, FilterError> {
        Filter::compile_in(expr, Scope { fields, primary: "id", dynamic: None })
    }

    /// [`Filter::compile`] with a primary key of another name and, optionally, dynamic fields.
    pub fn compile_in(expr: &str, scope: Scope<'_>) -> Result<Filter, FilterError> {
        // Checked before lexing so hostile input costs nothing.
        if expr.len() > MAX_FILTER_LEN {
            return Err(FilterError::TooLong(expr.len()));
        }
        let toks = lex(expr)?;
        let mut p = Parser { src: expr, toks, pos: 0, depth: 0, scope };
        let root = p.parse_or()?;
        let end = p.peek();
        if end.tok != Tok::Eof {
            return Err(p.unexpected(end, "\"and\", \"or\" or end of input"));
        }
        let filter = Filter { root };
        // The canonical form is what the WAL stores and replays through `compile`, so it must
        // pass the same limit; it can outgrow compact input (`a&&b` prints as `a and b`).
        let mut len = LenCounter(0);
        write!(len, "{filter}").expect("counting never fails");
        if len.0 > MAX_FILTER_LEN {
            return Err(FilterError::TooLong(len.0));
        }
        Ok(filter)
    }

    /// Whether the row matches. `row[i]` is the value of `fields[i]` given to `compile`
    /// (`None` = unset). Comparisons on unset fields are false, and `not` negates that result
    /// (see the module docs). A value whose type differs from its field's declared type, or a
    /// missing trailing slot, is treated as unset rather than trusted.
    pub fn matches(&self, id: i64, row: &[Option<Scalar>]) -> bool {
        self.root.eval(id, row)
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.fmt(f)
    }
}

struct LenCounter(usize);

impl fmt::Write for LenCounter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Compiled form and evaluation

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    /// The operator that gives the same result with the operands swapped (`3 < x` is `x > 3`).
    fn flip(self) -> CmpOp {
        match self {
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            op => op,
        }
    }

    /// `ord` is `None` when the operands are unordered (a NaN value), where IEEE 754 makes
    /// every comparison false except `!=`.
    fn test(self, ord: Option<Ordering>) -> bool {
        let Some(o) = ord else { return self == CmpOp::Ne };
        match self {
            CmpOp::Eq => o.is_eq(),
            CmpOp::Ne => o.is_ne(),
            CmpOp::Lt => o.is_lt(),
            CmpOp::Le => o.is_le(),
            CmpOp::Gt => o.is_gt(),
            CmpOp::Ge => o.is_ge(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Id,
    Index(usize),
}

/// One step into a JSON value: an object key or an array index.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(Box<str>),
    Index(usize),
}

/// A field resolved at compile time; the name is kept only for `Display`. `path` is empty except
/// on Json fields, where the value compared is the one found at the end of the path.
#[derive(Debug, Clone)]
struct FieldRef {
    slot: Slot,
    ty: ScalarType,
    name: Box<str>,
    path: Box<[Step]>,
}

/// A borrowed row value, so evaluation never clones strings.
#[derive(Clone, Copy)]
enum Val<'a> {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(&'a str),
}

/// A JSON value as a comparable value: numbers, strings and bools; anything else is unset.
fn json_val(v: &serde_json::Value) -> Option<Val<'_>> {
    use serde_json::Value as J;
    match v {
        J::Bool(b) => Some(Val::Bool(*b)),
        J::String(s) => Some(Val::Str(s)),
        J::Number(n) => n.as_i64().map(Val::Int).or_else(|| n.as_f64().map(Val::Float)),
        J::Null | J::Array(_) | J::Object(_) => None,
    }
}

impl FieldRef {
    #[inline]
    fn get<'r>(&self, id: i64, row: &'r [Option<Scalar>]) -> Option<Val<'r>> {
        let value = match self.slot {
            Slot::Id => return Some(Val::Int(id)),
            Slot::Index(i) => row.get(i)?.as_ref()?,
        };
        // A wrongly typed value breaks the caller's contract; treating it as unset keeps
        // evaluation total and means the compile-time type check covers every pair below.
        match (value, self.ty) {
            (Scalar::Int64(v), ScalarType::Int64) => Some(Val::Int(*v)),
            (Scalar::Float64(v), ScalarType::Float64) => Some(Val::Float(*v)),
            (Scalar::Bool(v), ScalarType::Bool) => Some(Val::Bool(*v)),
            (Scalar::String(v), ScalarType::String) => Some(Val::Str(v)),
            (Scalar::Json(v), ScalarType::Json) => {
                let mut at: &serde_json::Value = v;
                for step in &self.path {
                    at = match step {
                        Step::Key(k) => at.get(&**k)?,
                        Step::Index(i) => at.get(*i)?,
                    };
                }
                json_val(at)
            }
            _ => None,
        }
    }
}

impl fmt::Display for FieldRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        for step in &self.path {
            match step {
                Step::Key(k) => write!(f, "[{}]", LitFmt(&Scalar::String(k.to_string())))?,
                Step::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;

/// Exact comparison of an integer with a float. Casting `i` to f64 would round above 2^53 and
/// make `qty == 9007199254740992.0` match a qty of 9007199254740993.
fn cmp_int_float(i: i64, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    if f >= TWO_POW_63 {
        return Some(Ordering::Less);
    }
    if f < -TWO_POW_63 {
        return Some(Ordering::Greater);
    }
    let whole = f.trunc();
    // `whole` is an integer within i64's range here, so the cast is exact.
    match i.cmp(&(whole as i64)) {
        Ordering::Equal => 0.0f64.partial_cmp(&(f - whole)),
        o => Some(o),
    }
}

/// The i64 equal to `f`, if there is one.
fn float_as_int(f: f64) -> Option<i64> {
    (f.fract() == 0.0 && (-TWO_POW_63..TWO_POW_63).contains(&f)).then_some(f as i64)
}

fn compare(v: Val<'_>, lit: &Scalar) -> Option<Ordering> {
    match (v, lit) {
        (Val::Int(a), Scalar::Int64(b)) => Some(a.cmp(b)),
        (Val::Int(a), Scalar::Float64(b)) => cmp_int_float(a, *b),
        (Val::Float(a), Scalar::Int64(b)) => cmp_int_float(*b, a).map(Ordering::reverse),
        (Val::Float(a), Scalar::Float64(b)) => a.partial_cmp(b),
        (Val::Bool(a), Scalar::Bool(b)) => Some(a.cmp(b)),
        (Val::Str(a), Scalar::String(b)) => Some(a.cmp(b.as_str())),
        // `compile` rejects these pairs for typed fields and `FieldRef::get` filters values;
        // on a JSON path the value's type is only known per row, and a mismatch is unordered.
        _ => None,
    }
}

/// The literals of an `in` list, indexed so that long lists (delete by `id in [...]`) cost
/// a hash lookup per row rather than a scan.
#[derive(Debug, Clone)]
struct InSet {
    /// As written, for `Display`.
    lits: Vec<Scalar>,
    ints: HashSet<i64>,
    /// Finite, sorted by `total_cmp`, which leaves it sorted for IEEE comparison too (-0.0
    /// and 0.0 are merely adjacent), so binary search finds IEEE-equal values.
    floats: Vec<f64>,
    strs: HashSet<Box<str>>,
    /// Indexed by `usize::from(b)`.
    bools: [bool; 2],
}

impl InSet {
    fn new(lits: Vec<Scalar>) -> InSet {
        let mut set = InSet { lits: Vec::new(), ints: HashSet::new(), floats: Vec::new(), strs: HashSet::new(), bools: [false; 2] };
        for lit in &lits {
            match lit {
                Scalar::Int64(v) => {
                    set.ints.insert(*v);
                }
                Scalar::Float64(v) => set.floats.push(*v),
                Scalar::Bool(b) => set.bools[usize::from(*b)] = true,
                Scalar::String(s) => {
                    set.strs.insert(s.as_str().into());
                }
                // The lexer produces no JSON literals.
                Scalar::Json(_) => {}
            }
        }
        set.floats.sort_by(f64::total_cmp);
        set.floats.dedup();
        set.lits = lits;
        set
    }

    fn contains(&self, v: Val<'_>) -> bool {
        match v {
            Val::Int(i) => {
                self.ints.contains(&i)
                    || self.floats.binary_search_by(|f| cmp_int_float(i, *f).map_or(Ordering::Equal, Ordering::reverse)).is_ok()
            }
            Val::Float(f) => {
                // NaN equals nothing; checked first because the search below needs an order.
                !f.is_nan()
                    && (self.floats.binary_search_by(|x| x.partial_cmp(&f).unwrap_or(Ordering::Equal)).is_ok()
                        || float_as_int(f).is_some_and(|i| self.ints.contains(&i)))
            }
            Val::Bool(b) => self.bools[usize::from(b)],
            Val::Str(s) => self.strs.contains(s),
        }
    }
}

#[derive(Debug, Clone)]
enum Node {
    Const(bool),
    Cmp {
        field: FieldRef,
        op: CmpOp,
        lit: Scalar,
    },
    In {
        field: FieldRef,
        set: Box<InSet>,
        negated: bool,
    },
    /// A Bool field used on its own.
    Truthy(FieldRef),
    Like {
        field: FieldRef,
        pattern: Box<Pattern>,
    },
    Not(Box<Node>),
    /// Flattened n-ary, so long `a and b and ...` chains stay shallow to evaluate, print and drop.
    And(Vec<Node>),
    Or(Vec<Node>),
}

impl Node {
    fn eval(&self, id: i64, row: &[Option<Scalar>]) -> bool {
        match self {
            Node::Const(b) => *b,
            // On a JSON path a value of another type than the literal is unordered: it passes
            // no comparison, `!=` included (unlike a NaN), as if it were unset.
            Node::Cmp { field, op, lit } => field.get(id, row).is_some_and(|v| {
                let ord = compare(v, lit);
                (ord.is_some() || !field.is_json()) && op.test(ord)
            }),
            Node::Like { field, pattern } => matches!(field.get(id, row), Some(Val::Str(s)) if pattern.matches(s)),
            Node::In { field, set, negated } => field.get(id, row).is_some_and(|v| set.contains(v) != *negated),
            Node::Truthy(field) => matches!(field.get(id, row), Some(Val::Bool(true))),
            Node::Not(n) => !n.eval(id, row),
            Node::And(parts) => parts.iter().all(|n| n.eval(id, row)),
            Node::Or(parts) => parts.iter().any(|n| n.eval(id, row)),
        }
    }

    fn join(parts: Vec<Node>, and: bool) -> Node {
        let mut flat = Vec::with_capacity(parts.len());
        for p in parts {
            match (p, and) {
                (Node::And(inner), true) | (Node::Or(inner), false) => flat.extend(inner),
                (p, _) => flat.push(p),
            }
        }
        match (flat.len(), and) {
            (1, _) => flat.pop().expect("one element"),
            (_, true) => Node::And(flat),
            (_, false) => Node::Or(flat),
        }
    }

    fn negate(self) -> Node {
        match self {
            Node::Not(inner) => *inner,
            n => Node::Not(Box::new(n)),
        }
    }

    /// Binding strength, for printing only the parentheses the grammar needs.
    fn prec(&self) -> u8 {
        match self {
            Node::Or(_) => 1,
            Node::And(_) => 2,
            _ => 3,
        }
    }

    fn fmt_child(&self, f: &mut fmt::Formatter<'_>, min_prec: u8) -> fmt::Result {
        if self.prec() < min_prec { write!(f, "({self})") } else { write!(f, "{self}") }
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Const(b) => write!(f, "{b}"),
            Node::Cmp { field, op, lit } => write!(f, "{field} {} {}", op.symbol(), LitFmt(lit)),
            Node::Like { field, pattern } => write!(f, "{field} like {}", LitFmt(&Scalar::String(pattern.text.clone()))),
            Node::In { field, set, negated } => {
                write!(f, "{field} {}in [", if *negated { "not " } else { "" })?;
                for (i, lit) in set.lits.iter().enumerate() {
                    if i > 0 {
                        // No space: long id lists are the common large filter, and their
                        // canonical form must stay within the length limit.
                        f.write_str(",")?;
                    }
                    write!(f, "{}", LitFmt(lit))?;
                }
                f.write_str("]")
            }
            Node::Truthy(field) => write!(f, "{field}"),
            // No parentheses around a comparison: `not x == 1` already means `not (x == 1)`, and
            // adding them could push a filter at the depth limit over it when recompiled.
            Node::Not(inner) => {
                f.write_str("not ")?;
                inner.fmt_child(f, 3)
            }
            Node::And(parts) | Node::Or(parts) => {
                let (sep, min_prec) = if matches!(self, Node::And(_)) { (" and ", 3) } else { (" or ", 2) };
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        f.write_str(sep)?;
                    }
                    p.fmt_child(f, min_prec)?;
                }
                Ok(())
            }
        }
    }
}

/// Prints a literal so that the lexer reads back the same value.
struct LitFmt<'a>(&'a Scalar);

impl fmt::Display for LitFmt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Scalar::Int64(v) => write!(f, "{v}"),
            Scalar::Float64(v) => {
                // Both forms are shortest round-trip and always contain `.` or `e`, so they
                // read back as floats; pick the shorter (`1e300`, but `0.5` over `5e-1`).
                let plain = format!("{v:?}");
                let exp = format!("{v:e}");
                f.write_str(if exp.len() < plain.len() { &exp } else { &plain })
            }
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::String(s) => {
                f.write_char('"')?;
                for c in s.chars() {
                    match c {
                        '\\' => f.write_str("\\\\")?,
                        '"' => f.write_str("\\\"")?,
                        '\n' => f.write_str("\\n")?,
                        '\t' => f.write_str("\\t")?,
                        c => f.write_char(c)?,
                    }
                }
                f.write_char('"')
            }
            Scalar::Json(v) => write!(f, "{v}"),
        }
    }
}

fn describe_lit(lit: &Scalar) -> String {
    match lit {
        Scalar::Int64(_) => format!("integer {}", LitFmt(lit)),
        Scalar::Float64(_) => format!("float {}", LitFmt(lit)),
        Scalar::Bool(b) => format!("boolean {b}"),
        Scalar::String(s) => format!("string {s:?}"),
        Scalar::Json(v) => format!("JSON {v}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident,
    Lit(Scalar),
    Cmp(CmpOp),
    And,
    Or,
    Not,
    In,
    Like,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Eof,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    /// 1-based character column.
    col: usize,
    /// Byte range in the source.
    start: usize,
    end: usize,
}

fn syntax(column: usize, message: impl Into<String>) -> FilterError {
    FilterError::Syntax { column, message: message.into() }
}

fn lex(src: &str) -> Result<Vec<Token>, FilterError> {
    let chars: Vec<(usize, char)> = src.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let byte = |i: usize| chars.get(i).map_or(src.len(), |&(b, _)| b);
    let mut toks = Vec::new();
    let mut i = 0;
    while let Some(c) = at(i) {
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let next = at(i + 1);
        let tok = match c {
            '(' | ')' | '[' | ']' | ',' => {
                i += 1;
                match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    '[' => Tok::LBracket,
                    ']' => Tok::RBracket,
                    _ => Tok::Comma,
                }
            }
            '=' | '!' | '<' | '>' => {
                let eq = next == Some('=');
                i += 1 + usize::from(eq);
                match (c, eq) {
                    ('=', true) => Tok::Cmp(CmpOp::Eq),
                    ('=', false) => return Err(syntax(col, "unexpected \"=\", use \"==\" to compare")),
                    ('!', true) => Tok::Cmp(CmpOp::Ne),
                    ('!', false) => Tok::Not,
                    ('<', true) => Tok::Cmp(CmpOp::Le),
                    ('<', false) => Tok::Cmp(CmpOp::Lt),
                    ('>', true) => Tok::Cmp(CmpOp::Ge),
                    _ => Tok::Cmp(CmpOp::Gt),
                }
            }
            '&' | '|' => {
                if next != Some(c) {
                    return Err(syntax(col, format!("unexpected \"{c}\", use \"{c}{c}\"")));
                }
                i += 2;
                if c == '&' { Tok::And } else { Tok::Or }
            }
            '"' | '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match at(i) {
                        None => return Err(syntax(col, "unterminated string literal")),
                        Some(q) if q == c => break,
                        Some('\\') => {
                            s.push(match at(i + 1) {
                                Some('\\') => '\\',
                                Some('"') => '"',
                                Some('\'') => '\'',
                                Some('n') => '\n',
                                Some('t') => '\t',
                                None => return Err(syntax(col, "unterminated string literal")),
                                Some(e) => return Err(syntax(i + 1, format!("unknown escape \"\\{e}\" in string"))),
                            });
                            i += 2;
                        }
                        Some(ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                i += 1;
                Tok::Lit(Scalar::String(s))
            }
            '-' | '0'..='9' => {
                let digits = |mut j: usize| {
                    while at(j).is_some_and(|d| d.is_ascii_digit()) {
                        j += 1;
                    }
                    j
                };
                let mut j = i + usize::from(c == '-');
                if !at(j).is_some_and(|d| d.is_ascii_digit()) {
                    return Err(syntax(col, "unexpected \"-\", a minus sign must be followed by a digit"));
                }
                j = digits(j);
                let mut is_float = false;
                if at(j) == Some('.') {
                    is_float = true;
                    if !at(j + 1).is_some_and(|d| d.is_ascii_digit()) {
                        return Err(syntax(j + 2, "expected a digit after \".\" in number"));
                    }
                    j = digits(j + 1);
                }
                if matches!(at(j), Some('e' | 'E')) {
                    is_float = true;
                    j += 1;
                    if matches!(at(j), Some('+' | '-')) {
                        j += 1;
                    }
                    if !at(j).is_some_and(|d| d.is_ascii_digit()) {
                        return Err(syntax(j + 1, "expected a digit in the exponent of number"));
                    }
                    j = digits(j);
                }
                // `3abc` or `1.2.3` is one bad token, not a number followed by something else.
                if at(j).is_some_and(|d| d.is_alphanumeric() || d == '_' || d == '.') {
                    let mut k = j;
                    while at(k).is_some_and(|d| d.is_alphanumeric() || d == '_' || d == '.') {
                        k += 1;
                    }
                    return Err(syntax(col, format!("invalid number {:?}", &src[byte(i)..byte(k)])));
                }
                let text = &src[byte(i)..byte(j)];
                i = j;
                if is_float {
                    match text.parse::<f64>() {
                        Ok(v) if v.is_finite() => Tok::Lit(Scalar::Float64(v)),
                        _ => return Err(syntax(col, format!("float {text} is out of range"))),
                    }
                } else {
                    match text.parse::<i64>() {
                        Ok(v) => Tok::Lit(Scalar::Int64(v)),
                        Err(_) => return Err(syntax(col, format!("integer {text} is out of range for Int64"))),
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == '$' => {
                i += 1;
                while at(i).is_some_and(|d| d.is_ascii_alphanumeric() || d == '_') {
                    i += 1;
                }
                let word = &src[byte(start)..byte(i)];
                match word.to_ascii_lowercase().as_str() {
                    "and" => Tok::And,
                    "or" => Tok::Or,
                    "not" => Tok::Not,
                    "in" => Tok::In,
                    "like" => Tok::Like,
                    "true" => Tok::Lit(Scalar::Bool(true)),
                    "false" => Tok::Lit(Scalar::Bool(false)),
                    _ => Tok::Ident,
                }
            }
            c => return Err(syntax(col, format!("unexpected character {c:?}"))),
        };
        toks.push(Token { tok, col, start: byte(start), end: byte(i) });
    }
    toks.push(Token { tok: Tok::Eof, col: chars.len() + 1, start: src.len(), end: src.len() });
    Ok(toks)
}

// ---------------------------------------------------------------------------------------------
// Parser and type checker (one pass)

enum Operand {
    Field(FieldRef),
    Lit(Scalar),
}

struct Parser<'a> {
    src: &'a str,
    toks: Vec<Token>,
    pos: usize,
    /// Current parenthesis depth; bounding it bounds the recursion, so hostile input cannot
    /// overflow the stack.
    depth: usize,
    scope: Scope<'a>,
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        &self.toks[self.pos]
    }

    fn bump(&mut self) -> Token {
        let t = self.toks[self.pos].clone();
        // Stay on the final Eof so callers can keep asking.
        if t.tok != Tok::Eof {
            self.pos += 1;
        }
        t
    }

    fn describe(&self, t: &Token) -> String {
        match t.tok {
            Tok::Eof => "end of input".to_string(),
            _ => format!("{:?}", &self.src[t.start..t.end]),
        }
    }

    fn unexpected(&self, found: &Token, expected: &str) -> FilterError {
        syntax(found.col, format!("expected {expected}, found {}", self.describe(found)))
    }

    fn parse_or(&mut self) -> Result<Node, FilterError> {
        let mut parts = vec![self.parse_and()?];
        while self.peek().tok == Tok::Or {
            self.bump();
            parts.push(self.parse_and()?);
        }
        Ok(Node::join(parts, false))
    }

    fn parse_and(&mut self) -> Result<Node, FilterError> {
        let mut parts = vec![self.parse_unary()?];
        while self.peek().tok == Tok::And {
            self.bump();
            parts.push(self.parse_unary()?);
        }
        Ok(Node::join(parts, true))
    }

    fn parse_unary(&mut self) -> Result<Node, FilterError> {
        // Counted in a loop, not recursion: `not not ... x` of any length needs no stack, and
        // two-valued logic lets pairs cancel.
        let mut negate = false;
        while self.peek().tok == Tok::Not {
            self.bump();
            negate = !negate;
        }
        let node = self.parse_primary()?;
        Ok(if negate { node.negate() } else { node })
    }

    fn parse_primary(&mut self) -> Result<Node, FilterError> {
        let t = self.bump();
        match t.tok {
            Tok::LParen => {
                self.depth += 1;
                if self.depth > MAX_FILTER_DEPTH {
                    return Err(FilterError::TooDeep);
                }
                let inner = self.parse_or()?;
                let close = self.peek();
                if close.tok != Tok::RParen {
                    return Err(self.unexpected(close, &format!("\")\" to close the \"(\" at column {}", t.col)));
                }
                self.bump();
                self.depth -= 1;
                Ok(inner)
            }
            Tok::Ident | Tok::Lit(_) => self.parse_condition(t),
            _ => Err(self.unexpected(&t, "a condition")),
        }
    }

    /// A literal, or a field with its JSON path (`meta["a"][0]`), consuming the path's tokens.
    fn operand(&mut self, t: Token) -> Result<Operand, FilterError> {
        let Tok::Lit(lit) = t.tok else {
            let name = &self.src[t.start..t.end];
            if self.peek().tok == Tok::LParen {
                return Err(FilterError::Unsupported(format!("function {name}(...)")));
            }
            let fields = self.scope.fields;
            let mut field = if name == self.scope.primary {
                FieldRef { slot: Slot::Id, ty: ScalarType::Int64, name: name.into(), path: Box::new([]) }
            } else if let Some(i) = fields.iter().position(|f| f.name == name) {
                FieldRef { slot: Slot::Index(i), ty: fields[i].ty, name: name.into(), path: Box::new([]) }
            } else if let Some(i) = self.scope.dynamic {
                let path = Box::new([Step::Key(name.into())]);
                FieldRef { slot: Slot::Index(i), ty: ScalarType::Json, name: fields[i].name.as_str().into(), path }
            } else {
                return Err(FilterError::UnknownField(name.to_string()));
            };
            let mut path = field.path.to_vec();
            while self.peek().tok == Tok::LBracket {
                let open = self.bump();
                if field.ty != ScalarType::Json {
                    return Err(syntax(open.col, format!("field {name:?} is {:?}, not Json: it has no keys to index", field.ty)));
                }
                let key = self.bump();
                path.push(match key.tok {
                    Tok::Lit(Scalar::String(k)) => Step::Key(k.into()),
                    Tok::Lit(Scalar::Int64(i)) if i >= 0 => Step::Index(i as usize),
                    _ => return Err(self.unexpected(&key, "a string key or an array index in \"[...]\"")),
                });
                let close = self.bump();
                if close.tok != Tok::RBracket {
                    return Err(self.unexpected(&close, "\"]\""));
                }
            }
            field.path = path.into();
            return Ok(Operand::Field(field));
        };
        Ok(Operand::Lit(lit))
    }

    /// A condition starting with a field or literal: a comparison, an `in` test, or a lone
    /// Bool field / `true` / `false`.
    fn parse_condition(&mut self, first: Token) -> Result<Node, FilterError> {
        let first_desc = self.describe(&first);
        let first_col = first.col;
        let left = self.operand(first)?;
        let next = self.peek().clone();
        match next.tok {
            Tok::Like => {
                self.bump();
                let Operand::Field(field) = left else {
                    return Err(syntax(first_col, format!("expected a field before \"like\", found {first_desc}")));
                };
                if !matches!(field.ty, ScalarType::String | ScalarType::Json) {
                    return Err(FilterError::Type(format!("field {:?} is {:?}, \"like\" needs a string", field.name, field.ty)));
                }
                let t = self.bump();
                let Tok::Lit(Scalar::String(text)) = t.tok else {
                    return Err(self.unexpected(&t, "a string pattern after \"like\""));
                };
                Ok(Node::Like { field, pattern: Box::new(Pattern::new(text)) })
            }
            Tok::Cmp(op) => {
                self.bump();
                let rt = self.bump();
                if !matches!(rt.tok, Tok::Ident | Tok::Lit(_)) {
                    return Err(self.unexpected(&rt, &format!("a value after {:?}", op.symbol())));
                }
                let (rcol, rdesc) = (rt.col, self.describe(&rt));
                match (left, self.operand(rt)?) {
                    (Operand::Field(f), Operand::Lit(l)) => cmp_node(f, op, l),
                    (Operand::Lit(l), Operand::Field(f)) => cmp_node(f, op.flip(), l),
                    (Operand::Field(_), Operand::Field(_)) => {
                        Err(syntax(rcol, format!("cannot compare field {first_desc} with field {rdesc}, one side must be a literal")))
                    }
                    (Operand::Lit(_), Operand::Lit(_)) => Err(syntax(
                        first_col,
                        format!("cannot compare literal {first_desc} with literal {rdesc}, one side must be a field"),
                    )),
                }
            }
            Tok::In | Tok::Not => {
                self.bump();
                let negated = next.tok == Tok::Not;
                if negated {
                    let t = self.bump();
                    if t.tok != Tok::In {
                        return Err(self.unexpected(&t, "\"in\" after \"not\""));
                    }
                }
                let Operand::Field(field) = left else {
                    return Err(syntax(first_col, format!("expected a field before \"in\", found {first_desc}")));
                };
                let lits = self.parse_list()?;
                for lit in &lits {
                    check_lit(&field, lit, " in list")?;
                }
                Ok(Node::In { field, set: Box::new(InSet::new(lits)), negated })
            }
            _ => match left {
                Operand::Field(f) if f.ty == ScalarType::Bool || f.is_json() => Ok(Node::Truthy(f)),
                Operand::Field(f) => Err(FilterError::Type(format!(
                    "field {:?} is {:?}, not Bool, so it cannot be a condition on its own; compare it with a value",
                    f.name, f.ty
                ))),
                Operand::Lit(Scalar::Bool(b)) => Ok(Node::Const(b)),
                Operand::Lit(_) => Err(self.unexpected(&next, &format!("a comparison operator after {first_desc}"))),
            },
        }
    }

    fn parse_list(&mut self) -> Result<Vec<Scalar>, FilterError> {
        let open = self.bump();
        if open.tok != Tok::LBracket {
            return Err(self.unexpected(&open, "\"[\" after \"in\""));
        }
        let mut lits = Vec::new();
        loop {
            let t = self.bump();
            match t.tok {
                Tok::RBracket => return Ok(lits),
                Tok::Lit(lit) => lits.push(lit),
                _ => return Err(self.unexpected(&t, "a literal or \"]\" in the list")),
            }
            let t = self.bump();
            match t.tok {
                Tok::Comma => {}
                Tok::RBracket => return Ok(lits),
                _ => return Err(self.unexpected(&t, "\",\" or \"]\" in the list")),
            }
        }
    }
}

fn check_lit(field: &FieldRef, lit: &Scalar, context: &str) -> Result<(), FilterError> {
    use ScalarType as T;
    if field.is_json() {
        // A JSON value's type is known per row only; a mismatch is false there.
        return Ok(());
    }
    let ok = matches!(
        (field.ty, lit),
        (T::Int64 | T::Float64, Scalar::Int64(_) | Scalar::Float64(_)) | (T::Bool, Scalar::Bool(_)) | (T::String, Scalar::String(_))
    );
    if ok {
        Ok(())
    } else {
        Err(FilterError::Type(format!("field {:?} is {:?}, cannot compare with {}{context}", field.name, field.ty, describe_lit(lit))))
    }
}

fn cmp_node(field: FieldRef, op: CmpOp, lit: Scalar) -> Result<Node, FilterError> {
    check_lit(&field, &lit, "")?;
    if field.ty == ScalarType::Bool && !matches!(op, CmpOp::Eq | CmpOp::Ne) {
        return Err(FilterError::Type(format!(
            "field {:?} is Bool, operator {:?} is not allowed (only == and !=)",
            field.name,
            op.symbol()
        )));
    }
    Ok(Node::Cmp { field, op, lit })
}

impl FieldRef {
    fn is_json(&self) -> bool {
        self.ty == ScalarType::Json
    }
}

/// A `like` pattern: `%` any run, `_` any one character, `\\%` / `\\_` literal.
#[derive(Debug, Clone)]
struct Pattern {
    /// As written, for `Display`.
    text: String,
    parts: Vec<PatPart>,
}

#[derive(Debug, Clone, PartialEq)]
enum PatPart {
    Lit(char),
    One,
    Any,
}

impl Pattern {
    fn new(text: String) -> Pattern {
        let mut parts = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            parts.push(match c {
                '\\' if matches!(chars.peek(), Some('%' | '_')) => PatPart::Lit(chars.next().expect("peeked")),
                '%' => PatPart::Any,
                '_' => PatPart::One,
                c => PatPart::Lit(c),
            });
        }
        parts.dedup_by(|a, b| *a == PatPart::Any && *b == PatPart::Any);
        Pattern { text, parts }
    }

    /// Greedy matching with backtracking to the last `%`: linear in practice, and at worst
    /// O(pattern x text), never exponential.
    fn matches(&self, s: &str) -> bool {
        let text: Vec<char> = s.chars().collect();
        let (mut p, mut t) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match self.parts.get(p) {
                Some(PatPart::Any) => {
                    star = Some((p, t));
                    p += 1;
                }
                Some(PatPart::One) => {
                    p += 1;
                    t += 1;
                }
                Some(PatPart::Lit(c)) if *c == text[t] => {
                    p += 1;
                    t += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        self.parts[p..].iter().all(|x| *x == PatPart::Any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn schema() -> Vec<FieldDef> {
        let f = |name: &str, ty| FieldDef { name: name.into(), ty };
        vec![
            f("price", ScalarType::Float64),
            f("qty", ScalarType::Int64),
            f("active", ScalarType::Bool),
            f("name", ScalarType::String),
            f("tag", ScalarType::String),
            f("flag", ScalarType::Bool),
        ]
    }

    /// id 42, price 9.5, qty 5, active, name "widget", tag and flag unset.
    fn row() -> Vec<Option<Scalar>> {
        vec![
            Some(Scalar::Float64(9.5)),
            Some(Scalar::Int64(5)),
            Some(Scalar::Bool(true)),
            Some(Scalar::String("widget".into())),
            None,
            None,
        ]
    }

    /// Evaluates `expr` on `row`, checking on the way that the canonical form agrees.
    fn eval_on(expr: &str, id: i64, row: &[Option<Scalar>]) -> bool {
        let f = Filter::compile(expr, &schema()).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let again = Filter::compile(&f.to_string(), &schema()).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(f.matches(id, row), again.matches(id, row), "{expr} vs canonical {f}");
        f.matches(id, row)
    }

    fn check_table(cases: &[(&str, bool)], id: i64, row: &[Option<Scalar>]) {
        for &(expr, want) in cases {
            assert_eq!(eval_on(expr, id, row), want, "{expr}");
        }
    }

    #[test]
    fn comparisons_and_membership() {
        check_table(
            &[
                ("qty == 5", true),
                ("qty != 5", false),
                ("qty < 5", false),
                ("qty <= 5", true),
                ("qty > 4", true),
                ("qty >= 6", false),
                ("6 > qty", true),
                ("5 <= qty", true),
                ("9.5 == price", true),
                ("name == \"widget\"", true),
                ("name < 'x'", true),
                ("name >= 'widgets'", false),
                ("active", true),
                ("active == false", false),
                ("active != false", true),
                ("id == 42", true),
                ("id in [1, 42, 7]", true),
                ("id not in [1, 42]", false),
                ("qty in [1, 2, 3]", false),
                ("qty not in [1, 2, 3]", true),
                ("name in ['gadget', 'widget']", true),
                ("active in [false]", false),
                ("price in [9.5]", true),
                ("qty in []", false),
                ("qty not in []", true),
                ("qty in [1, 2,]", false),
                ("true", true),
                ("FALSE", false),
            ],
            42,
            &row(),
        );
    }

    #[test]
    fn like_patterns() {
        for (pattern, text, want) in [
            ("red%", "red_7", true),
            ("red%", "dark red", false),
            ("%red", "dark red", true),
            ("%ar%", "dark red", true),
            ("r_d", "red", true),
            ("r_d", "reed", false),
            ("%", "", true),
            ("", "", true),
            ("a%b%c", "axxbyyc", true),
            ("a%b%c", "axxbyy", false),
            ("50\\%", "50%", true),
            ("50\\%", "500", false),
        ] {
            assert_eq!(Pattern::new(pattern.into()).matches(text), want, "{pattern:?} on {text:?}");
        }
        check_table(&[("name like 'wid%'", true), ("name like 'x%'", false), ("not name like '%get'", false)], 42, &row());
        let e = Filter::compile("qty like 'a%'", &schema()).unwrap_err();
        assert!(e.to_string().contains("\"qty\" is Int64"), "{e}");
    }

    /// A schema with a Json field `meta` and dynamic fields in `$meta`, primary key `pk`.
    fn json_scope_row() -> (Vec<FieldDef>, Vec<Option<Scalar>>) {
        let fields = vec![
            FieldDef { name: "meta".into(), ty: ScalarType::Json },
            FieldDef { name: "qty".into(), ty: ScalarType::Int64 },
            FieldDef { name: DYNAMIC_FIELD.into(), ty: ScalarType::Json },
        ];
        let meta = serde_json::json!({"color": "red", "sizes": [3, 4.5], "deep": {"ok": true}});
        let dynamic = serde_json::json!({"brand": "acme", "rank": 7});
        let row = vec![Some(Scalar::Json(Box::new(meta))), Some(Scalar::Int64(5)), Some(Scalar::Json(Box::new(dynamic)))];
        (fields, row)
    }

    #[test]
    fn json_paths_dynamic_fields_and_a_named_primary_key() {
        let (fields, row) = json_scope_row();
        let scope = Scope { fields: &fields, primary: "pk", dynamic: Some(2) };
        for (expr, want) in [
            ("meta['color'] == 'red'", true),
            ("meta[\"sizes\"][1] > 4", true),
            ("meta['sizes'][0] in [1, 2, 3]", true),
            ("meta['sizes'][9] == 3", false),
            ("meta['deep']['ok']", true),
            ("meta['color'] like 'r%'", true),
            // Another type than the literal's is false, `!=` included.
            ("meta['color'] == 3", false),
            ("meta['color'] != 3", false),
            ("brand == 'acme'", true),
            ("rank >= 7 and qty == 5", true),
            ("missing == 1", false),
            ("$meta['brand'] == 'acme'", true),
            ("pk == 9", true),
            ("pk in [1, 2]", false),
        ] {
            let f = Filter::compile_in(expr, scope).unwrap_or_else(|e| panic!("{expr}: {e}"));
            let again = Filter::compile_in(&f.to_string(), scope).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(f.matches(9, &row), want, "{expr} (canonical {f})");
            assert_eq!(again.matches(9, &row), want, "canonical {f} of {expr}");
        }
        // Without dynamic fields an unknown name is an error, and `id` is not the key's name.
        let strict = Scope { fields: &fields, primary: "pk", dynamic: None };
        assert!(matches!(Filter::compile_in("brand == 'x'", strict), Err(FilterError::UnknownField(f)) if f == "brand"));
        assert!(matches!(Filter::compile_in("id == 1", strict), Err(FilterError::UnknownField(f)) if f == "id"));
        let e = Filter::compile_in("qty['a'] == 1", strict).unwrap_err();
        assert!(e.to_string().contains("not Json"), "{e}");
        let e = Filter::compile_in("json_contains(meta['sizes'], 3)", scope).unwrap_err();
        assert_eq!(e, FilterError::Unsupported("function json_contains(...)".into()));
    }

    #[test]
    fn boolean_logic_and_precedence() {
        check_table(
            &[
                // `or` binding tighter would give false for each of these.
                ("true or false and false", true),
                ("false and false or true", true),
                ("true || false && false", true),
                ("(true or false) and false", false),
                // `not` binding looser would give true.
                ("not false and false", false),
                ("!false && false", false),
                ("not (false and false)", true),
                ("not not active", true),
                ("!!!active", false),
                ("not qty == 5", false),
                ("not qty in [5]", false),
                ("qty == 5 AND Not active Or name == 'widget'", true),
                ("qty == 5 and (not active or name == 'x')", false),
            ],
            42,
            &row(),
        );
    }

    #[test]
    fn unset_fields_are_null() {
        check_table(
            &[
                ("tag == 'a'", false),
                ("tag != 'a'", false),
                ("tag < 'a'", false),
                ("tag in ['a']", false),
                ("tag not in ['a']", false),
                ("tag not in []", false),
                ("not (tag == 'a')", true),
                ("not tag in ['a']", true),
                ("flag", false),
                ("not flag", true),
                ("flag == false", false),
            ],
            42,
            &row(),
        );
        // Missing trailing slots and wrongly typed values read as unset too.
        let short = vec![Some(Scalar::Float64(1.0))];
        assert!(!eval_on("qty != 1", 1, &short));
        let mut bad = row();
        bad[1] = Some(Scalar::String("5".into()));
        assert!(!eval_on("qty != 1", 1, &bad));
        assert!(!eval_on("qty not in [1]", 1, &bad));
    }

    #[test]
    fn int_float_mixing_is_exact() {
        check_table(
            &[
                ("qty == 5.0", true),
                ("qty < 5.5", true),
                ("qty > 4.9", true),
                ("qty == 5.5", false),
                ("qty >= 5e0", true),
                ("qty in [5.0]", true),
                ("qty in [4.5, 5.5]", false),
                ("price > 9", true),
                ("price < 10", true),
                ("price in [1, 9.5]", true),
                ("price in [9]", false),
                ("price == -2e3", false),
            ],
            42,
            &row(),
        );
        // 2^53 + 1 has no f64; a cast would make it equal to 2^53.
        let mut big = row();
        big[1] = Some(Scalar::Int64(9_007_199_254_740_993));
        check_table(
            &[
                ("qty == 9007199254740992.0", false),
                ("qty > 9007199254740992.0", true),
                ("qty in [9007199254740992.0]", false),
                ("qty < 1e300", true),
                ("qty > -1e300", true),
            ],
            1,
            &big,
        );
        big[0] = Some(Scalar::Float64(9_007_199_254_740_992.0));
        assert!(!eval_on("price == 9007199254740993", 1, &big));
        assert!(eval_on("price < 9007199254740993", 1, &big));
        assert!(!eval_on("price in [9007199254740993]", 1, &big));
        // IEEE: -0.0 == 0.0, and NaN compares false except for `!=`.
        big[0] = Some(Scalar::Float64(-0.0));
        assert!(eval_on("price == 0.0", 1, &big) && eval_on("price in [0.0]", 1, &big));
        assert!(eval_on("price in [0]", 1, &big));
        big[0] = Some(Scalar::Float64(f64::NAN));
        assert!(!eval_on("price == 1.0", 1, &big) && !eval_on("price < 1", 1, &big));
        assert!(eval_on("price != 1", 1, &big));
        assert!(!eval_on("price in [1.0, 2]", 1, &big) && eval_on("price not in [1.0]", 1, &big));
        assert!(eval_on("id == -9223372036854775808", i64::MIN, &big));
    }

    #[test]
    fn string_escapes() {
        let mut r = row();
        r[3] = Some(Scalar::String("it's \"q\"\\\n\tend".into()));
        check_table(
            &[
                (r#"name == 'it\'s "q"\\\n\tend'"#, true),
                (r#"name == "it's \"q\"\\\n\tend""#, true),
                (r#"name == "it's \"q\"\\\nend""#, false),
            ],
            1,
            &r,
        );
        let f = Filter::compile(r#"name == 'it\'s "q"\\\n\tend'"#, &schema()).unwrap();
        assert_eq!(f.to_string(), r#"name == "it's \"q\"\\\n\tend""#);
    }

    #[test]
    fn canonical_display() {
        let cases = [
            ("3 < price", "price > 3"),
            ("!active && qty==1 || name=='x'", "not active and qty == 1 or name == \"x\""),
            ("(active or flag) and qty != -1", "(active or flag) and qty != -1"),
            ("((active)) or (flag or (true))", "active or flag or true"),
            ("(active and flag) and (qty > 1 and qty < 3)", "active and flag and qty > 1 and qty < 3"),
            ("not (qty == 1 and active)", "not (qty == 1 and active)"),
            ("not (not active)", "active"),
            ("!(qty == 1)", "not qty == 1"),
            ("qty NOT IN [1, 2]", "qty not in [1,2]"),
            ("id in []", "id in []"),
            ("price == 1e15 or price == 0.5 or price <= -2E3", "price == 1e15 or price == 0.5 or price <= -2e3"),
            ("price >= 100000", "price >= 100000"),
            ("price < 1.5e-9", "price < 1.5e-9"),
        ];
        for (input, want) in cases {
            let f = Filter::compile(input, &schema()).unwrap();
            assert_eq!(f.to_string(), want, "{input}");
            assert_eq!(Filter::compile(want, &schema()).unwrap().to_string(), want);
        }
    }

    fn err(expr: &str) -> FilterError {
        match Filter::compile(expr, &schema()) {
            Ok(f) => panic!("{expr} compiled to {f}"),
            Err(e) => e,
        }
    }

    #[test]
    fn syntax_errors_name_column_and_token() {
        assert_eq!(err("qty ==").to_string(), "filter syntax error at column 7: expected a value after \"==\", found end of input");
        let cases: &[(&str, usize, &str)] = &[
            ("qty = 5", 5, "unexpected \"=\", use \"==\" to compare"),
            ("qty == 5 & active", 10, "unexpected \"&\", use \"&&\""),
            ("active | flag", 8, "unexpected \"|\", use \"||\""),
            ("qty @ 5", 5, "unexpected character '@'"),
            ("(qty == 5", 10, "expected \")\" to close the \"(\" at column 1, found end of input"),
            ("qty == 5 )", 10, "expected \"and\", \"or\" or end of input, found \")\""),
            ("qty == 5 active", 10, "expected \"and\", \"or\" or end of input, found \"active\""),
            ("name == \"abc", 9, "unterminated string literal"),
            ("name == 'a\\q'", 11, "unknown escape \"\\q\" in string"),
            ("qty == 99999999999999999999", 8, "integer 99999999999999999999 is out of range for Int64"),
            ("price == 1e999", 10, "float 1e999 is out of range"),
            ("price == 1.", 12, "expected a digit after \".\" in number"),
            ("price == 1e+", 13, "expected a digit in the exponent of number"),
            ("qty == 3abc", 8, "invalid number \"3abc\""),
            ("qty == - 3", 8, "unexpected \"-\", a minus sign must be followed by a digit"),
            ("1 == 2", 1, "cannot compare literal \"1\" with literal \"2\", one side must be a field"),
            ("qty == price", 8, "cannot compare field \"qty\" with field \"price\", one side must be a literal"),
            ("5 in [1]", 1, "expected a field before \"in\", found \"5\""),
            ("qty in [1, price]", 12, "expected a literal or \"]\" in the list, found \"price\""),
            ("qty in [1 2]", 11, "expected \",\" or \"]\" in the list, found \"2\""),
            ("qty in 1", 8, "expected \"[\" after \"in\", found \"1\""),
            ("qty not 5", 9, "expected \"in\" after \"not\", found \"5\""),
            ("5", 2, "expected a comparison operator after \"5\", found end of input"),
            ("and", 1, "expected a condition, found \"and\""),
            ("active and", 11, "expected a condition, found end of input"),
            ("", 1, "expected a condition, found end of input"),
            ("qty == )", 8, "expected a value after \"==\", found \")\""),
            ("née == 1", 2, "unexpected character 'é'"),
        ];
        for &(expr, column, message) in cases {
            assert_eq!(err(expr), FilterError::Syntax { column, message: message.into() }, "{expr}");
        }
    }

    #[test]
    fn unknown_fields_and_type_errors() {
        assert_eq!(err("nope == 1"), FilterError::UnknownField("nope".into()));
        assert_eq!(err("qty == 1 or Qty == 2"), FilterError::UnknownField("Qty".into()));
        assert_eq!(err("5 < nope"), FilterError::UnknownField("nope".into()));
        assert_eq!(
            err("price == \"x\"").to_string(),
            "type mismatch in filter: field \"price\" is Float64, cannot compare with string \"x\""
        );
        let cases: &[(&str, &str)] = &[
            ("qty == true", "field \"qty\" is Int64, cannot compare with boolean true"),
            ("name > 3", "field \"name\" is String, cannot compare with integer 3"),
            ("active == 1.5", "field \"active\" is Bool, cannot compare with float 1.5"),
            ("active < true", "field \"active\" is Bool, operator \"<\" is not allowed (only == and !=)"),
            ("name in ['a', 1]", "field \"name\" is String, cannot compare with integer 1 in list"),
            ("id in ['7']", "field \"id\" is Int64, cannot compare with string \"7\" in list"),
            ("qty", "field \"qty\" is Int64, not Bool, so it cannot be a condition on its own; compare it with a value"),
            ("not name", "field \"name\" is String, not Bool, so it cannot be a condition on its own; compare it with a value"),
        ];
        for &(expr, message) in cases {
            assert_eq!(err(expr), FilterError::Type(message.into()), "{expr}");
        }
    }

    /// Runs `f` on a thread with a small stack, so unbounded recursion would crash the test.
    // 1 MiB: enough for the 64 levels the parser allows even in an unoptimised build, far too
    // little for the 60,000 levels the input below would need if depth were not bounded.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new().stack_size(1024 * 1024).spawn(f).unwrap().join().unwrap()
    }

    #[test]
    fn nesting_and_length_limits() {
        let nested = |n: usize| format!("{}active{}", "(".repeat(n), ")".repeat(n));
        assert!(Filter::compile(&nested(MAX_FILTER_DEPTH), &schema()).is_ok());
        assert_eq!(err(&nested(MAX_FILTER_DEPTH + 1)), FilterError::TooDeep);
        let r = on_small_stack(move || Filter::compile(&"(".repeat(60_000), &schema()).map(|_| ()));
        assert_eq!(r, Err(FilterError::TooDeep));
        let r = on_small_stack(move || Filter::compile(&nested(100_000), &schema()).map(|_| ()));
        assert_eq!(r, Err(FilterError::TooLong(200_006)));
        // `not` chains are counted, not recursed on.
        let nots = on_small_stack(|| {
            let f = Filter::compile(&format!("{}active", "not ".repeat(16_001)), &schema()).unwrap();
            (f.to_string(), f.matches(1, &row()))
        });
        assert_eq!(nots, ("not active".to_string(), false));

        let padded = |n: usize| format!("active{}", " ".repeat(n - 6));
        assert!(Filter::compile(&padded(MAX_FILTER_LEN), &schema()).is_ok());
        assert_eq!(err(&padded(MAX_FILTER_LEN + 1)), FilterError::TooLong(MAX_FILTER_LEN + 1));
        assert_eq!(FilterError::TooLong(70_000).to_string(), "filter too long: 70000 bytes, limit 65536");
        // Compact input whose canonical form would not fit the limit is refused up front, so
        // the logged form always recompiles: 65534 bytes as written, 90107 in canonical form.
        let compact = vec!["active"; 8192].join("&&");
        assert!(compact.len() <= MAX_FILTER_LEN);
        assert_eq!(err(&compact), FilterError::TooLong(8192 * 6 + 8191 * 5));
        // A long flat chain evaluates and prints without deep recursion.
        let chain = vec!["active"; 5000].join(" or ");
        assert!(on_small_stack(move || Filter::compile(&chain, &schema()).unwrap().matches(1, &row())));
    }

    #[test]
    fn large_in_list() {
        let ids: Vec<String> = (0..10_000).map(|i| (i * 3).to_string()).collect();
        let f = Filter::compile(&format!("id in [{}]", ids.join(",")), &schema()).unwrap();
        let hits = (0..30_000).filter(|&id| f.matches(id, &[])).count();
        assert_eq!(hits, 10_000);
        assert!(f.matches(29_997, &[]) && !f.matches(29_998, &[]) && !f.matches(30_000, &[]));
    }

    #[test]
    fn filter_is_send_sync_clone() {
        fn assert_traits<T: Send + Sync + Clone>() {}
        assert_traits::<Filter>();
    }

    // --- property test: random well-typed trees vs a reference evaluator -------------------

    const NAMES: [&str; 5] = ["i", "f", "b", "s", "id"];
    const TYPES: [ScalarType; 5] = [ScalarType::Int64, ScalarType::Float64, ScalarType::Bool, ScalarType::String, ScalarType::Int64];
    const OPS: [CmpOp; 6] = [CmpOp::Eq, CmpOp::Ne, CmpOp::Lt, CmpOp::Le, CmpOp::Gt, CmpOp::Ge];
    const STRINGS: [&str; 8] = ["", "a", "b", "it's", "say \"hi\"", "back\\slash", "tab\tnew\nline", "é"];

    fn prop_schema() -> Vec<FieldDef> {
        (0..4).map(|i| FieldDef { name: NAMES[i].into(), ty: TYPES[i] }).collect()
    }

    /// Expression tree; the bools choose between equivalent spellings.
    #[derive(Debug, Clone)]
    enum T {
        Const(bool),
        Truthy,
        Cmp { field: usize, op: CmpOp, lit: Scalar, lit_left: bool },
        In { field: usize, lits: Vec<Scalar>, negated: bool },
        Not(Box<T>, bool),
        And(Box<T>, Box<T>, bool),
        Or(Box<T>, Box<T>, bool),
    }

    fn int_strategy() -> BoxedStrategy<i64> {
        prop_oneof![4 => -4i64..4, 1 => prop::sample::select(vec![i64::MIN, i64::MAX, 9_007_199_254_740_993])].boxed()
    }

    fn float_strategy(with_nan: bool) -> BoxedStrategy<f64> {
        let mut special = vec![-0.0, 0.5, -1.5, 1e300, 9_007_199_254_740_992.0, 9.3e18, -9.3e18, TWO_POW_63];
        if with_nan {
            special.extend([f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
        }
        prop_oneof![(-4i32..4).prop_map(f64::from), prop::sample::select(special)].boxed()
    }

    fn lit_strategy(ty: ScalarType) -> BoxedStrategy<Scalar> {
        match ty {
            ScalarType::Int64 | ScalarType::Float64 => {
                prop_oneof![int_strategy().prop_map(Scalar::Int64), float_strategy(false).prop_map(Scalar::Float64)].boxed()
            }
            ScalarType::Bool => any::<bool>().prop_map(Scalar::Bool).boxed(),
            ScalarType::String => prop::sample::select(STRINGS.to_vec()).prop_map(|s| Scalar::String(s.into())).boxed(),
            ScalarType::Json => unreachable!("the generated schema has no Json field"),
        }
    }

    fn tree_strategy() -> impl Strategy<Value = T> {
        let cmp = (0usize..5, 0usize..6, any::<bool>()).prop_flat_map(|(field, op, lit_left)| {
            let op = if TYPES[field] == ScalarType::Bool { OPS[op % 2] } else { OPS[op] };
            lit_strategy(TYPES[field]).prop_map(move |lit| T::Cmp { field, op, lit: lit.clone(), lit_left })
        });
        let within = (0usize..5, any::<bool>()).prop_flat_map(|(field, negated)| {
            prop::collection::vec(lit_strategy(TYPES[field]), 0..5).prop_map(move |lits| T::In { field, lits, negated })
        });
        let leaf = prop_oneof![1 => any::<bool>().prop_map(T::Const), 1 => Just(T::Truthy), 4 => cmp, 2 => within];
        leaf.prop_recursive(5, 40, 2, |inner| {
            prop_oneof![
                (inner.clone(), any::<bool>()).prop_map(|(t, s)| T::Not(Box::new(t), s)),
                (inner.clone(), inner.clone(), any::<bool>()).prop_map(|(a, b, s)| T::And(Box::new(a), Box::new(b), s)),
                (inner.clone(), inner, any::<bool>()).prop_map(|(a, b, s)| T::Or(Box::new(a), Box::new(b), s)),
            ]
        })
    }

    fn lit_source(lit: &Scalar) -> String {
        match lit {
            Scalar::Int64(v) => v.to_string(),
            Scalar::Float64(v) => format!("{v:?}"),
            Scalar::Bool(b) => if *b { "True" } else { "false" }.to_string(),
            Scalar::String(s) => {
                let esc = s.replace('\\', "\\\\").replace('\'', "\\'").replace('\n', "\\n").replace('\t', "\\t");
                format!("'{esc}'")
            }
            Scalar::Json(_) => unreachable!("filters have no JSON literals"),
        }
    }

    /// Prints a tree in a non-canonical spelling: full parentheses, mixed operator styles.
    fn source(t: &T) -> String {
        match t {
            T::Const(b) => if *b { "TRUE" } else { "false" }.to_string(),
            T::Truthy => "b".to_string(),
            T::Cmp { field, op, lit, lit_left: false } => format!("{}{}{}", NAMES[*field], op.symbol(), lit_source(lit)),
            T::Cmp { field, op, lit, lit_left: true } => {
                format!("{} {} {}", lit_source(lit), op.flip().symbol(), NAMES[*field])
            }
            T::In { field, lits, negated } => {
                let lits: Vec<String> = lits.iter().map(lit_source).collect();
                format!("{} {}in [{}]", NAMES[*field], if *negated { "NOT " } else { "" }, lits.join(","))
            }
            T::Not(a, bang) => format!("{}({})", if *bang { "!" } else { "not " }, source(a)),
            T::And(a, b, sym) => format!("({}{}{})", source(a), if *sym { "&&" } else { " and " }, source(b)),
            T::Or(a, b, sym) => format!("({}{}{})", source(a), if *sym { "||" } else { " Or " }, source(b)),
        }
    }

    /// Independent exact int/float comparison: rounding is monotone, so if the rounded integer
    /// differs from `f` it orders the same way, and if it equals `f` then `f` is integral.
    fn ref_int_float(i: i64, f: f64) -> Option<Ordering> {
        let r = i as f64;
        if f.is_nan() {
            None
        } else if r != f {
            r.partial_cmp(&f)
        } else {
            Some(i128::from(i).cmp(&(f as i128)))
        }
    }

    fn ref_cmp(a: &Scalar, b: &Scalar) -> Option<Ordering> {
        match (a, b) {
            (Scalar::Int64(x), Scalar::Int64(y)) => Some(x.cmp(y)),
            (Scalar::Float64(x), Scalar::Float64(y)) => x.partial_cmp(y),
            (Scalar::Int64(x), Scalar::Float64(y)) => ref_int_float(*x, *y),
            (Scalar::Float64(x), Scalar::Int64(y)) => ref_int_float(*y, *x).map(Ordering::reverse),
            (Scalar::Bool(x), Scalar::Bool(y)) => Some(x.cmp(y)),
            (Scalar::String(x), Scalar::String(y)) => Some(x.cmp(y)),
            _ => panic!("ill-typed tree: {a:?} vs {b:?}"),
        }
    }

    fn ref_eval(t: &T, id: i64, row: &[Option<Scalar>]) -> bool {
        let value = |field: usize| if field == 4 { Some(Scalar::Int64(id)) } else { row[field].clone() };
        match t {
            T::Const(b) => *b,
            T::Truthy => row[2] == Some(Scalar::Bool(true)),
            T::Cmp { field, op, lit, .. } => value(*field).is_some_and(|v| match (op, ref_cmp(&v, lit)) {
                (CmpOp::Ne, None) => true,
                (_, None) => false,
                (CmpOp::Eq, Some(o)) => o == Ordering::Equal,
                (CmpOp::Ne, Some(o)) => o != Ordering::Equal,
                (CmpOp::Lt, Some(o)) => o == Ordering::Less,
                (CmpOp::Le, Some(o)) => o != Ordering::Greater,
                (CmpOp::Gt, Some(o)) => o == Ordering::Greater,
                (CmpOp::Ge, Some(o)) => o != Ordering::Less,
            }),
            T::In { field, lits, negated } => {
                value(*field).is_some_and(|v| lits.iter().any(|l| ref_cmp(&v, l) == Some(Ordering::Equal)) != *negated)
            }
            T::Not(a, _) => !ref_eval(a, id, row),
            T::And(a, b, _) => ref_eval(a, id, row) && ref_eval(b, id, row),
            T::Or(a, b, _) => ref_eval(a, id, row) || ref_eval(b, id, row),
        }
    }

    fn row_strategy() -> impl Strategy<Value = (i64, Vec<Option<Scalar>>)> {
        (
            int_strategy(),
            prop::option::of(int_strategy().prop_map(Scalar::Int64)),
            prop::option::of(float_strategy(true).prop_map(Scalar::Float64)),
            prop::option::of(any::<bool>().prop_map(Scalar::Bool)),
            prop::option::of(lit_strategy(ScalarType::String)),
        )
            .prop_map(|(id, i, f, b, s)| (id, vec![i, f, b, s]))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn display_round_trip_evaluates_identically(
            tree in tree_strategy(),
            rows in prop::collection::vec(row_strategy(), 12),
        ) {
            let text = source(&tree);
            let first = Filter::compile(&text, &prop_schema());
            prop_assert!(first.is_ok(), "{} -> {:?}", text, first);
            let first = first.unwrap();
            let canonical = first.to_string();
            let second = Filter::compile(&canonical, &prop_schema());
            prop_assert!(second.is_ok(), "{} -> {:?}", canonical, second);
            let second = second.unwrap();
            prop_assert_eq!(second.to_string(), canonical.clone(), "canonical form is not a fixed point");
            for (id, row) in &rows {
                let want = ref_eval(&tree, *id, row);
                prop_assert_eq!(first.matches(*id, row), want, "{} on id {} {:?}", text, id, row);
                prop_assert_eq!(second.matches(*id, row), want, "{} on id {} {:?}", canonical, id, row);
            }
        }
    }
}
