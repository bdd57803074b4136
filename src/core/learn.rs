//! Learning pins from what a backend sends back: a session cookie it sets, the id in a
//! redirect's `Location`, and the id in the links of the first page (a streaming scanner);
//! and telling the backend's words from an echo of the request's ([`mentions`]).

use crate::core::session_id::{IdRules, from_query, percent_decoded};

/// Which part of a reply named the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LearnSource {
    /// A `Set-Cookie` of a session cookie name.
    SetCookie,
    /// The session field in a redirect's `Location`.
    Location,
    /// The session field in the links of an HTML page.
    PageBody,
    /// A request carrying a valid affinity cookie and an id not yet known.
    AffinityCookie,
}

impl LearnSource {
    /// A short stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LearnSource::SetCookie => "set-cookie",
            LearnSource::Location => "location",
            LearnSource::PageBody => "page-body",
            LearnSource::AffinityCookie => "affinity-cookie",
        }
    }
}

/// The session id a `Set-Cookie` header sets, if it names a session cookie and does not
/// delete it (`Max-Age=0`, or an `Expires` at or before `now`, unix seconds).
pub fn id_in_set_cookie<'a>(
    header: &'a str,
    names: &[Box<str>],
    rules: &IdRules,
    now: i64,
) -> Option<&'a str> {
    let cookie = cookie::Cookie::parse(header).ok()?;
    let name = cookie.name_raw()?;
    if !names.iter().any(|n| &**n == name) {
        return None;
    }
    if cookie.max_age().is_some_and(|age| age.whole_seconds() <= 0)
        || cookie
            .expires_datetime()
            .is_some_and(|at| at.unix_timestamp() <= now)
    {
        return None;
    }
    let value = cookie.value_raw()?;
    rules.is_valid(value.as_bytes()).then_some(value)
}

/// The session id in a `Location` header's query (absolute or relative URL).
pub fn id_in_location<'a>(location: &'a str, param: &str, rules: &IdRules) -> Option<&'a str> {
    let location = location.split_once('#').map_or(location, |(l, _)| l);
    let (_, query) = location.split_once('?')?;
    from_query(query, param, rules)
}

/// Whether `text` names `id` as a whole token: a longest run of id characters (under
/// `rules`) equal to it, read with `%XX` escapes decoded, so `q=%3F_s%3DKEY` and
/// `q=%4B%45%59` both name `KEY`. A request that names an id this way may see it reflected
/// in its reply, by a page or a redirect that repeats its input: such a reply is the
/// client's word, not the backend's.
pub fn mentions(text: &[u8], id: &[u8], rules: &IdRules) -> bool {
    // How much of `id` the current token has matched; `None` once it differs.
    let mut matched = Some(0);
    for b in percent_decoded(text) {
        if rules.allows(b) {
            matched = matched.filter(|&k| id.get(k) == Some(&b)).map(|k| k + 1);
        } else {
            if matched == Some(id.len()) {
                return true;
            }
            matched = Some(0);
        }
    }
    matched == Some(id.len())
}

/// Finds `PARAM=ID` in the links of the first bytes of an HTML reply as it streams past,
/// chunk by chunk.
///
/// Only where a page links somewhere does the id count: in the value of an `href`, `src`,
/// `action` or `formaction` attribute, of any `data-*` attribute, of an inline event handler
/// (`onclick`, …), and in the text of an inline `<script>` (Seaside's JavaScript callbacks
/// carry `_s` in such URLs and strings). Text, other attributes (`value`, `title`, …),
/// comments and the content of `<style>`, `<textarea>` and `<title>` teach nothing, so a page
/// that shows what a client sent it (a search page, an error page) does not make that a
/// session. There the field must follow `?`, `&`, `;` (as in `href="/app?_s=KEY&amp;_k=…"`),
/// a quote (a JavaScript string) or the start of the value, so `x_s=…` is not mistaken for it.
///
/// The markup is followed by a small state machine fed byte by byte (with `memchr` over the
/// stretches that cannot matter, and a whole tag read in one pass when it lies within the
/// chunk and links to no session): it never holds a chunk, keeps a few bytes of state
/// between chunks (the id in a fixed buffer), and gives the same answer however the page is
/// split.
/// It reads no further than the first `limit` bytes (an id whose field starts within them is
/// read to its end). The reply is forwarded untouched and undelayed.
pub struct PageScanner {
    /// Bytes left before the end of the window.
    budget: usize,
    markup: Markup,
    /// The tag being read is an end tag: its attributes teach nothing.
    end_tag: bool,
    /// The first bytes of the current tag or attribute name.
    name: [u8; NAME_LEN],
    /// The full length of that name.
    name_len: usize,
    /// The element the start tag being read opens, when its content is raw text.
    opens: Raw,
    /// The element whose raw text is being read.
    raw: Raw,
    /// How much of `</NAME` that ends the raw text has been read (0: none; 1: `<`; 2: `</`;
    /// then one more per byte of the name).
    raw_end: usize,
    /// The quote that closes the current attribute value (0: unquoted).
    quote: u8,
    /// Whether the current attribute value or script may carry a session link.
    links: bool,
    /// How many `-` end the comment text read so far (at most 2).
    dashes: u8,
    /// The last byte of the current value or script read, to check what precedes a needle.
    prev: u8,
    /// Bytes of the needle matched so far (0 = looking for its first byte).
    matched: usize,
    /// Collecting an id after a full needle.
    collecting: bool,
    id: [u8; IdRules::MAX_LEN_LIMIT],
    id_len: usize,
    done: bool,
}

/// Where the scanner is in the markup (after the HTML tokenizer's states, simplified).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Markup {
    /// Text between tags.
    Text,
    /// After `<`.
    TagOpen,
    /// After `<!`.
    DeclarationOpen,
    /// After `<!-`.
    CommentOpen,
    /// Inside `<!-- … -->`.
    Comment,
    /// A declaration (`<!DOCTYPE …>`), a processing instruction or a malformed tag: up to
    /// the next `>`.
    Bogus,
    /// After `</`.
    EndTagOpen,
    /// A tag's name.
    TagName,
    /// Before an attribute's name.
    BeforeAttrName,
    /// An attribute's name.
    AttrName,
    /// After an attribute's name.
    AfterAttrName,
    /// After `=`.
    BeforeAttrValue,
    /// An attribute's value.
    AttrValue,
    /// After a quoted value's closing quote.
    AfterAttrValue,
    /// After `/` in a tag.
    SelfClosing,
    /// The content of a raw text element, up to its end tag.
    RawText,
}

/// Elements whose content is not markup: a `<` there opens no tag until their end tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Raw {
    None,
    Script,
    Style,
    Textarea,
    Title,
}

impl Raw {
    /// The element named `name` (its first bytes at least, any case), `len` bytes long.
    fn of(name: &[u8], len: usize) -> Raw {
        let is = |word: &[u8]| is_named(name, len, word);
        if is(b"script") {
            Raw::Script
        } else if is(b"style") {
            Raw::Style
        } else if is(b"textarea") {
            Raw::Textarea
        } else if is(b"title") {
            Raw::Title
        } else {
            Raw::None
        }
    }

    fn name(self) -> &'static [u8] {
        match self {
            Raw::None => b"",
            Raw::Script => b"script",
            Raw::Style => b"style",
            Raw::Textarea => b"textarea",
            Raw::Title => b"title",
        }
    }
}

/// Bytes of a tag or attribute name kept: enough to tell `formaction` and `textarea`.
const NAME_LEN: usize = 10;

/// A space between attributes (a bit of [`CLASS`]).
const SPACE: u8 = 1;
/// Ends a tag's name: a space, `/` or `>`.
const ENDS_TAG_NAME: u8 = 2;
/// Ends an attribute's name: a space, `/`, `>` or `=`.
const ENDS_ATTR_NAME: u8 = 4;
/// Ends an unquoted value: a space or `>`.
const ENDS_UNQUOTED: u8 = 8;

/// What each byte value is to the markup, as bits, so that the loops over names and spaces
/// test one table entry a byte.
static CLASS: [u8; 256] = {
    let mut class = [0u8; 256];
    let spaces = [b' ', b'\t', b'\n', b'\r', b'\x0c'];
    let mut i = 0;
    while i < spaces.len() {
        class[spaces[i] as usize] = SPACE | ENDS_TAG_NAME | ENDS_ATTR_NAME | ENDS_UNQUOTED;
        i += 1;
    }
    class[b'/' as usize] = ENDS_TAG_NAME | ENDS_ATTR_NAME;
    class[b'>' as usize] = ENDS_TAG_NAME | ENDS_ATTR_NAME | ENDS_UNQUOTED;
    class[b'=' as usize] = ENDS_ATTR_NAME;
    class
};

/// Whether `b` is of `class`.
#[inline]
fn is(class: u8, b: u8) -> bool {
    CLASS[usize::from(b)] & class != 0
}

/// Whitespace between a tag's attributes.
#[inline]
fn is_space(b: u8) -> bool {
    is(SPACE, b)
}

/// Where in `bytes` the first byte of `class` is.
#[inline]
fn first_of(class: u8, bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| is(class, b))
}

/// How many bytes at the start of `bytes` are spaces.
#[inline]
fn spaces(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .position(|&b| !is_space(b))
        .unwrap_or(bytes.len())
}

/// What may come right before the session field in a link: a query's `?`, a field
/// separator `&` (`;` ends `&amp;`), or a JavaScript string's quote; `"` also stands for
/// the start of a value.
fn is_boundary(b: u8) -> bool {
    matches!(b, b'?' | b'&' | b';' | b'"' | b'\'')
}

/// Whether a name `len` bytes long, of which `name` holds the first (at least
/// `min(len, NAME_LEN)`), is `word`, in any case.
fn is_named(name: &[u8], len: usize, word: &[u8]) -> bool {
    len == word.len()
        && name
            .get(..len)
            .is_some_and(|n| n.eq_ignore_ascii_case(word))
}

/// Whether a name `len` bytes long, of which `name` holds the first, starts with `prefix`
/// (lowercase) and goes on, in any case.
fn is_prefixed(name: &[u8], len: usize, prefix: &[u8]) -> bool {
    len > prefix.len()
        && name
            .get(..prefix.len())
            .is_some_and(|n| n.eq_ignore_ascii_case(prefix))
}

/// Whether an attribute (the first bytes of its name, and the name's length) holds a URL
/// or script that may link to a session.
fn carries_links(name: &[u8], len: usize) -> bool {
    let is = |word: &[u8]| is_named(name, len, word);
    is(b"href")
        || is(b"src")
        || is(b"action")
        || is(b"formaction")
        || is_prefixed(name, len, b"data-")
        || is_prefixed(name, len, b"on")
}

/// Whether the state machine might find `needle` in a link's `value`: where its first byte
/// follows a boundary, the whole needle follows. A needle whose first byte recurs in it
/// could start inside a partial match, which the state machine reads its own way: any
/// first byte after a boundary counts then.
fn may_hold_field(value: &[u8], needle: &[u8]) -> bool {
    let recurs = needle[1..].contains(&needle[0]);
    memchr::memchr_iter(needle[0], value).any(|at| {
        let before = if at == 0 { b'"' } else { value[at - 1] };
        is_boundary(before) && (recurs || value[at..].starts_with(needle))
    })
}

/// How many `-` end the comment text read so far, `before` counting those ending what came
/// before `text` (at most 2).
fn trailing_dashes(before: u8, text: &[u8]) -> u8 {
    let run = text
        .iter()
        .rev()
        .take(2)
        .take_while(|&&b| b == b'-')
        .count();
    if run == text.len() {
        (usize::from(before) + run).min(2) as u8
    } else {
        run as u8
    }
}

impl PageScanner {
    /// A scanner that looks at most at the first `limit` bytes.
    pub fn new(limit: usize) -> Self {
        PageScanner {
            budget: limit,
            markup: Markup::Text,
            end_tag: false,
            name: [0; NAME_LEN],
            name_len: 0,
            opens: Raw::None,
            raw: Raw::None,
            raw_end: 0,
            quote: 0,
            links: false,
            dashes: 0,
            prev: 0,
            matched: 0,
            collecting: false,
            id: [0; IdRules::MAX_LEN_LIMIT],
            id_len: 0,
            done: limit == 0,
        }
    }

    /// Whether the scanner found an id or gave up; later chunks need not be fed.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Examines the next chunk; returns the id once found. `needle` is `PARAM=`.
    pub fn feed(&mut self, chunk: &[u8], needle: &[u8], rules: &IdRules) -> Option<&str> {
        let mut i = 0;
        while i < chunk.len() && !self.done {
            if self.collecting || self.matched > 0 {
                // Inside a link, one byte at a time, past the window too: a field that
                // started within it is read to its end.
                let b = chunk[i];
                let ends = self.ends_link(b);
                if self.collecting {
                    if !ends && rules.allows(b) {
                        if self.id_len < rules.max_len() {
                            self.id[self.id_len] = b;
                            self.id_len += 1;
                            self.prev = b;
                            self.spend(1);
                            i += 1;
                        } else {
                            // Longer than any valid id: not a session field after all.
                            self.collecting = false;
                        }
                        continue;
                    }
                    self.collecting = false;
                    if rules.is_valid(&self.id[..self.id_len]) {
                        self.done = true;
                        return self.found();
                    }
                    // The byte that ended it is read again in the markup.
                    continue;
                }
                if !ends && b == needle[self.matched] {
                    self.prev = b;
                    self.spend(1);
                    i += 1;
                    self.matched += 1;
                    if self.matched == needle.len() {
                        self.matched = 0;
                        self.collecting = true;
                        self.id_len = 0;
                    }
                } else {
                    // Read again, as a possible start of the needle or the link's end.
                    self.matched = 0;
                }
                continue;
            }
            if self.budget == 0 {
                self.done = true;
                break;
            }
            let end = chunk.len().min(i + self.budget);
            let used = self.read_markup(&chunk[i..end], needle);
            self.spend(used);
            i += used;
        }
        None
    }

    /// The end of the reply: an id running up to the last byte counts.
    pub fn finish(&mut self, rules: &IdRules) -> Option<&str> {
        if self.done || !self.collecting || !rules.is_valid(&self.id[..self.id_len]) {
            return None;
        }
        self.done = true;
        self.found()
    }

    fn found(&self) -> Option<&str> {
        std::str::from_utf8(&self.id[..self.id_len]).ok()
    }

    fn spend(&mut self, bytes: usize) {
        self.budget = self.budget.saturating_sub(bytes);
    }

    /// Whether `b` ends the link being read: the value's closing quote (or, unquoted, a
    /// space or `>`), or a `<` in a script, which may begin its end tag.
    fn ends_link(&self, b: u8) -> bool {
        match self.markup {
            Markup::AttrValue if self.quote != 0 => b == self.quote,
            Markup::AttrValue => is(ENDS_UNQUOTED, b),
            _ => b == b'<',
        }
    }

    /// A needle's first byte was read in a link, after `before`.
    fn needle_starts(&mut self, before: u8, needle: &[u8]) {
        if !is_boundary(before) {
            return;
        }
        if needle.len() == 1 {
            self.collecting = true;
            self.id_len = 0;
        } else {
            self.matched = 1;
        }
    }

    fn name_starts(&mut self, b: u8) {
        self.name_len = 0;
        self.name_grows(&[b]);
    }

    fn name_grows(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.name_len < NAME_LEN {
                self.name[self.name_len] = b;
            }
            self.name_len = self.name_len.saturating_add(1);
        }
    }

    fn tag_named(&mut self) {
        self.opens = if self.end_tag {
            Raw::None
        } else {
            Raw::of(&self.name, self.name_len)
        };
    }

    fn tag_closes(&mut self) {
        self.links = false;
        if self.end_tag || self.opens == Raw::None {
            self.markup = Markup::Text;
            return;
        }
        self.markup = Markup::RawText;
        self.raw = self.opens;
        self.raw_end = 0;
        self.links = self.raw == Raw::Script;
        // The start of a script is no boundary: `_s=` must follow `?`, `&`, `;` or a quote.
        self.prev = b' ';
    }

    fn value_starts(&mut self, quote: u8) {
        self.markup = Markup::AttrValue;
        self.quote = quote;
        self.links = !self.end_tag && carries_links(&self.name, self.name_len);
        self.prev = b'"';
    }

    /// Reads markup from the start of `bytes` (within the window) until they end or a
    /// needle begins in a link; returns how many bytes it consumed.
    fn read_markup(&mut self, bytes: &[u8], needle: &[u8]) -> usize {
        let mut read = 0;
        while read < bytes.len() && self.matched == 0 && !self.collecting {
            read += self.step(&bytes[read..], needle);
        }
        read
    }

    /// Reads markup from the start of `bytes` (not empty) up to a point where the state
    /// changes; returns how many bytes it consumed (none when the state changed and the first
    /// byte is to be read again in the new one).
    fn step(&mut self, bytes: &[u8], needle: &[u8]) -> usize {
        let b = bytes[0];
        match self.markup {
            Markup::Text => match memchr::memchr(b'<', bytes) {
                None => bytes.len(),
                Some(at) => match self.whole_tag(&bytes[at..], needle) {
                    Some(len) => at + len,
                    None => {
                        self.markup = Markup::TagOpen;
                        at + 1
                    }
                },
            },
            Markup::TagOpen => {
                self.markup = match b {
                    b'!' => Markup::DeclarationOpen,
                    b'/' => Markup::EndTagOpen,
                    b'?' => Markup::Bogus,
                    _ if b.is_ascii_alphabetic() => {
                        self.end_tag = false;
                        self.name_starts(b);
                        Markup::TagName
                    }
                    _ => {
                        // A `<` that opens nothing is text.
                        self.markup = Markup::Text;
                        return 0;
                    }
                };
                1
            }
            Markup::DeclarationOpen | Markup::CommentOpen => {
                if b != b'-' {
                    self.markup = Markup::Bogus;
                    return 0;
                }
                if self.markup == Markup::DeclarationOpen {
                    self.markup = Markup::CommentOpen;
                } else {
                    self.markup = Markup::Comment;
                    // So that `<!-->` and `<!--->` end at once, as browsers read them.
                    self.dashes = 2;
                }
                1
            }
            Markup::Comment => match memchr::memchr(b'>', bytes) {
                None => {
                    self.dashes = trailing_dashes(self.dashes, bytes);
                    bytes.len()
                }
                Some(at) => {
                    if trailing_dashes(self.dashes, &bytes[..at]) == 2 {
                        self.markup = Markup::Text;
                    }
                    self.dashes = 0;
                    at + 1
                }
            },
            Markup::Bogus => match memchr::memchr(b'>', bytes) {
                None => bytes.len(),
                Some(at) => {
                    self.markup = Markup::Text;
                    at + 1
                }
            },
            Markup::EndTagOpen => {
                if b.is_ascii_alphabetic() {
                    self.end_tag = true;
                    self.name_starts(b);
                    self.markup = Markup::TagName;
                    1
                } else if b == b'>' {
                    self.markup = Markup::Text;
                    1
                } else {
                    self.markup = Markup::Bogus;
                    0
                }
            }
            Markup::TagName => {
                let n = first_of(ENDS_TAG_NAME, bytes).unwrap_or(bytes.len());
                self.name_grows(&bytes[..n]);
                let Some(&end) = bytes.get(n) else {
                    return n;
                };
                self.tag_named();
                match end {
                    b'/' => self.markup = Markup::SelfClosing,
                    b'>' => self.tag_closes(),
                    _ => self.markup = Markup::BeforeAttrName,
                }
                n + 1
            }
            Markup::BeforeAttrName | Markup::AfterAttrName => {
                let n = spaces(bytes);
                let Some(&b) = bytes.get(n) else {
                    return n;
                };
                match b {
                    b'/' => self.markup = Markup::SelfClosing,
                    b'>' => self.tag_closes(),
                    b'=' if self.markup == Markup::AfterAttrName => {
                        self.markup = Markup::BeforeAttrValue;
                    }
                    _ => {
                        self.name_starts(b);
                        self.markup = Markup::AttrName;
                    }
                }
                n + 1
            }
            Markup::AttrName => {
                let n = first_of(ENDS_ATTR_NAME, bytes).unwrap_or(bytes.len());
                self.name_grows(&bytes[..n]);
                let Some(&end) = bytes.get(n) else {
                    return n;
                };
                match end {
                    b'/' => self.markup = Markup::SelfClosing,
                    b'>' => self.tag_closes(),
                    b'=' => self.markup = Markup::BeforeAttrValue,
                    _ => self.markup = Markup::AfterAttrName,
                }
                n + 1
            }
            Markup::BeforeAttrValue => {
                let n = spaces(bytes);
                let Some(&b) = bytes.get(n) else {
                    return n;
                };
                match b {
                    b'"' | b'\'' => {
                        self.value_starts(b);
                        n + 1
                    }
                    b'>' => {
                        self.tag_closes();
                        n + 1
                    }
                    _ => {
                        self.value_starts(0);
                        n
                    }
                }
            }
            Markup::AttrValue if self.quote == 0 => {
                if is_space(b) {
                    self.links = false;
                    self.markup = Markup::BeforeAttrName;
                } else if b == b'>' {
                    self.tag_closes();
                } else {
                    if self.links && b == needle[0] {
                        self.needle_starts(self.prev, needle);
                    }
                    self.prev = b;
                }
                1
            }
            Markup::AttrValue => {
                let quote = self.quote;
                let next = if self.links {
                    memchr::memchr2(quote, needle[0], bytes)
                } else {
                    memchr::memchr(quote, bytes)
                };
                let Some(at) = next else {
                    self.prev = bytes[bytes.len() - 1];
                    return bytes.len();
                };
                if bytes[at] == quote {
                    self.links = false;
                    self.markup = Markup::AfterAttrValue;
                } else {
                    let before = if at > 0 { bytes[at - 1] } else { self.prev };
                    self.prev = bytes[at];
                    self.needle_starts(before, needle);
                }
                at + 1
            }
            Markup::AfterAttrValue => {
                match b {
                    b'/' => self.markup = Markup::SelfClosing,
                    b'>' => self.tag_closes(),
                    _ if is_space(b) => self.markup = Markup::BeforeAttrName,
                    _ => {
                        self.markup = Markup::BeforeAttrName;
                        return 0;
                    }
                }
                1
            }
            Markup::SelfClosing => {
                if b == b'>' {
                    // `<script/>` still opens a script in HTML.
                    self.tag_closes();
                    1
                } else {
                    self.markup = Markup::BeforeAttrName;
                    0
                }
            }
            Markup::RawText => self.read_raw_text(bytes, needle),
        }
    }

    /// Reads a whole tag (`bytes` starts with its `<`) in one pass, with the same outcome as
    /// reading it a state at a time, when it ends within `bytes` and holds nothing that needs
    /// a closer look: a session field in a link, a `/` other than the one of `/>`, a name
    /// starting with `=`, or no name at all (`<!`, `<?`, `</>`). `None` leaves the state as
    /// it was, for the state machine to read the tag. Most tags of a page are read here.
    fn whole_tag(&mut self, bytes: &[u8], needle: &[u8]) -> Option<usize> {
        let end_tag = bytes.get(1) == Some(&b'/');
        let mut i = 1 + usize::from(end_tag);
        if !bytes.get(i)?.is_ascii_alphabetic() {
            return None;
        }
        let name_end = i + first_of(ENDS_TAG_NAME, &bytes[i..])?;
        let opens = if end_tag {
            Raw::None
        } else {
            Raw::of(&bytes[i..name_end], name_end - i)
        };
        // The first byte from `at` on that is no space, and where it is.
        let solid = |at: usize| {
            let at = at + spaces(bytes.get(at..)?);
            Some((at, *bytes.get(at)?))
        };
        i = name_end;
        loop {
            let (at, b) = solid(i)?;
            i = at;
            match b {
                b'>' => break,
                b'/' if bytes.get(i + 1)? == &b'>' => {
                    i += 1;
                    break;
                }
                b'/' | b'=' => return None,
                _ => {}
            }
            let start = i;
            i += first_of(ENDS_ATTR_NAME, &bytes[i..])?;
            let links = !end_tag && carries_links(&bytes[start..i], i - start);
            let (at, b) = solid(i)?;
            i = at;
            if b != b'=' {
                continue;
            }
            let (at, b) = solid(i + 1)?;
            i = at;
            let (value, after) = match b {
                b'>' => break,
                quote @ (b'"' | b'\'') => {
                    let len = memchr::memchr(quote, &bytes[i + 1..])?;
                    (&bytes[i + 1..i + 1 + len], i + 2 + len)
                }
                _ => {
                    let len = first_of(ENDS_UNQUOTED, &bytes[i..])?;
                    (&bytes[i..i + len], i + len)
                }
            };
            if links && may_hold_field(value, needle) {
                return None;
            }
            i = after;
        }
        self.end_tag = end_tag;
        self.opens = opens;
        self.tag_closes();
        Some(i + 1)
    }

    /// Reads the content of a raw text element: looks for its end tag and, in a script,
    /// for the needle.
    fn read_raw_text(&mut self, bytes: &[u8], needle: &[u8]) -> usize {
        let b = bytes[0];
        if self.raw_end > 0 {
            let name = self.raw.name();
            let matched = match self.raw_end {
                1 => b == b'/',
                k if k - 2 < name.len() => b.to_ascii_lowercase() == name[k - 2],
                _ => {
                    // The whole name: an end tag if a space, `/` or `>` follows.
                    if !is(ENDS_TAG_NAME, b) {
                        self.raw_end = 0;
                        return 0;
                    }
                    self.raw = Raw::None;
                    self.raw_end = 0;
                    self.links = false;
                    self.end_tag = true;
                    self.opens = Raw::None;
                    match b {
                        b'>' => self.tag_closes(),
                        b'/' => self.markup = Markup::SelfClosing,
                        _ => self.markup = Markup::BeforeAttrName,
                    }
                    return 1;
                }
            };
            if matched {
                self.raw_end += 1;
                self.prev = b;
                return 1;
            }
            // Not the end tag: read the byte again as content.
            self.raw_end = 0;
            return 0;
        }
        let next = if self.links {
            memchr::memchr2(b'<', needle[0], bytes)
        } else {
            memchr::memchr(b'<', bytes)
        };
        let Some(at) = next else {
            self.prev = bytes[bytes.len() - 1];
            return bytes.len();
        };
        let before = if at > 0 { bytes[at - 1] } else { self.prev };
        self.prev = bytes[at];
        if bytes[at] == b'<' {
            self.raw_end = 1;
        } else {
            self.needle_starts(before, needle);
        }
        at + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules() -> IdRules {
        IdRules::default()
    }

    fn scan_chunks(chunks: &[&[u8]], limit: usize) -> Option<String> {
        let mut s = PageScanner::new(limit);
        for c in chunks {
            if let Some(id) = s.feed(c, b"_s=", &rules()) {
                return Some(id.to_string());
            }
        }
        s.finish(&rules()).map(str::to_string)
    }

    const PAGE: &[u8] = b"<html><body><a href=\"/x_s=NOPE\">n</a>\
<a href=\"/app?_s=Kd83jHs7aQ0pLm2x&amp;_k=aB3dE5fG\">go</a></body></html>";

    #[test]
    fn finds_the_first_link_id() {
        assert_eq!(
            scan_chunks(&[PAGE], 32768).as_deref(),
            Some("Kd83jHs7aQ0pLm2x")
        );
    }

    #[test]
    fn finds_an_id_split_anywhere_across_chunks() {
        for cut in 1..PAGE.len() {
            let (a, b) = PAGE.split_at(cut);
            assert_eq!(
                scan_chunks(&[a, b], 32768).as_deref(),
                Some("Kd83jHs7aQ0pLm2x"),
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = PAGE.chunks(1).collect();
        assert_eq!(
            scan_chunks(&bytes, 32768).as_deref(),
            Some("Kd83jHs7aQ0pLm2x")
        );
    }

    #[test]
    fn entity_encoded_ampersand_and_end_of_body_count() {
        assert_eq!(
            scan_chunks(&[b"<a href='/a?x=1&amp;_s=ENT1'>"], 100).as_deref(),
            Some("ENT1")
        );
        assert_eq!(
            scan_chunks(&[b"<a href=\"/a?_s=", b"ATEND"], 100).as_deref(),
            Some("ATEND")
        );
    }

    #[test]
    fn gives_up_past_its_limit() {
        let mut page = vec![b' '; 40_000];
        page.extend_from_slice(b"<a href=\"?_s=LATE\">");
        assert_eq!(scan_chunks(&[&page], 32_768), None);
        assert_eq!(scan_chunks(&[&page], 65_536).as_deref(), Some("LATE"));
        // A field that starts within the window is read to its end.
        let start = page.len() - 9; // where `_s=` begins
        assert_eq!(scan_chunks(&[&page], start).as_deref(), None);
        assert_eq!(scan_chunks(&[&page], start + 1).as_deref(), Some("LATE"));
    }

    #[test]
    fn overlong_ids_are_skipped_for_a_later_valid_one() {
        let long = "A".repeat(80);
        let page = format!("<a href=\"?_s={long}\"><a href=\"?_s=SHORT1\">");
        assert_eq!(
            scan_chunks(&[page.as_bytes()], 1000).as_deref(),
            Some("SHORT1")
        );
    }

    /// Where a page shows text, even text a client sent it, no session is learned.
    const NOT_LINKS: &[&str] = &[
        "<p>You searched for ?_s=EVIL</p>",
        "?_s=EVIL at the very start",
        "<input name=\"q\" value=\"?_s=EVIL\">",
        "<input name=q value=?_s=EVIL>",
        "<a title='&amp;_s=EVIL' class=\"x?_s=EVIL\">",
        "<!-- <a href=\"/app?_s=EVIL\"> -->",
        "<!-- a -- b > <a href=\"?_s=EVIL\"> -->",
        "<!DOCTYPE html ?_s=EVIL>",
        "<?xml version=\"1.0\" ?_s=EVIL?>",
        "<title>?_s=EVIL <a href=\"?_s=EVIL\"></title>",
        "<textarea><a href=\"/app?_s=EVIL\">?_s=EVIL</textarea>",
        "<style>a[href=\"?_s=EVIL\"] { color: red }</style>",
        "</a href=\"?_s=EVIL\">",
        "<a href=\"/x_s=EVIL\" src=\"/a?x_s=EVIL\">",
        "<script>var q = \"q=x_s=EVIL\";</script>",
        "<a data=\"?_s=EVIL\" on=\"?_s=EVIL\" hrefx=\"?_s=EVIL\">",
    ];

    #[test]
    fn text_other_attributes_comments_and_raw_text_teach_nothing() {
        for page in NOT_LINKS {
            assert_eq!(scan_chunks(&[page.as_bytes()], 32768), None, "{page}");
            let then = format!("{page}<a href=\"/app?_s=GOOD\">");
            assert_eq!(
                scan_chunks(&[then.as_bytes()], 32768).as_deref(),
                Some("GOOD"),
                "{page}"
            );
        }
    }

    /// How Seaside and pages like it link to a session (see SEASIDE.md).
    const LINKS: &[&str] = &[
        "<a href=\"/app?_s=ID&amp;_k=aB3dE5fG\">go</a>",
        "<A HREF='/app?_k=x&amp;_s=ID'>go</A>",
        "<a href=/app?_s=ID&amp;_k=x>go</a>",
        "<form method=\"post\" action=\"/app?_s=ID&amp;_k=x\">",
        "<button formaction=\"/app?_s=ID&amp;_k=x\">",
        "<img src=\"/app/chart?_s=ID&amp;_k=x\">",
        "<div data-callback=\"/app?_s=ID&amp;_k=x\">",
        "<div data-params=\"_s=ID&amp;_k=x\">",
        "<a href=\"#\" onclick=\"$.ajax({&quot;url&quot;:&quot;/app&quot;,&quot;data&quot;:[&quot;_s=ID&quot;,&quot;_k=x&quot;].join(&quot;&amp;&quot;)});return false\">",
        "<a onClick='location.href=\"/app?_s=ID\"'>",
        "<script type=\"text/javascript\">$(function(){$.ajax({\"url\":\"/app\",\"data\":[\"_s=ID\",\"_k=x\"].join(\"&\")})});</script>",
        "<script>if (a < b && c) { go('/app?_s=ID'); }</script>",
        "<a title=\"a > b\" href=\"/app?_s=ID\">",
        "<!--><a href=\"/app?_s=ID\">",
        "<!-- -- --><a href=\"/app?_s=ID\">",
        "<script>var s = \"</scripts>\"; go('?_s=ID');</script>",
    ];

    #[test]
    fn links_attributes_handlers_and_scripts_teach() {
        for page in LINKS {
            let page = page.replace("ID", "Kd83jHs7aQ0pLm2x");
            let bytes = page.as_bytes();
            assert_eq!(
                scan_chunks(&[bytes], 32768).as_deref(),
                Some("Kd83jHs7aQ0pLm2x"),
                "{page}"
            );
            let one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(
                scan_chunks(&one_by_one, 32768).as_deref(),
                Some("Kd83jHs7aQ0pLm2x"),
                "{page}, a byte at a time"
            );
        }
    }

    #[test]
    fn set_cookie_of_a_session_name_is_learned_unless_it_deletes() {
        let names: Box<[Box<str>]> = Box::new(["_s".into(), "counter".into()]);
        let r = rules();
        assert_eq!(
            id_in_set_cookie("_s=KEY1; Path=/app; HttpOnly", &names, &r, 0),
            Some("KEY1")
        );
        assert_eq!(
            id_in_set_cookie("counter=KEY2", &names, &r, 0),
            Some("KEY2")
        );
        assert_eq!(id_in_set_cookie("theme=dark", &names, &r, 0), None);
        assert_eq!(id_in_set_cookie("_s=KEY1; Max-Age=0", &names, &r, 0), None);
        assert_eq!(
            id_in_set_cookie(
                "_s=KEY1; Expires=Thu, 01 Jan 1970 00:00:01 GMT",
                &names,
                &r,
                100
            ),
            None
        );
        assert_eq!(id_in_set_cookie("_s=bad id", &names, &r, 0), None);
    }

    #[test]
    fn a_mention_is_a_whole_token_read_with_escapes_decoded() {
        let r = rules();
        let id = b"Kd83jHs7aQ0pLm2x";
        for text in [
            "/app?_s=Kd83jHs7aQ0pLm2x&_k=1",
            "/search?q=%3F_s%3DKd83jHs7aQ0pLm2x",
            "/search?q=%4Bd83jHs7aQ0pLm2%78",
            "theme=dark; _s=Kd83jHs7aQ0pLm2x",
            "Kd83jHs7aQ0pLm2x",
            "a=1&b=Kd83jHs7aQ0pLm2x",
        ] {
            assert!(mentions(text.as_bytes(), id, &r), "{text}");
        }
        for text in [
            "",
            "/app?_s=Kd83jHs7aQ0pLm2xY",
            "/app?_s=XKd83jHs7aQ0pLm2x",
            "/app?_s=Kd83jHs7aQ0pLm2",
            "%4",
            "q=Kd83jHs7aQ0pLm2%7",
        ] {
            assert!(!mentions(text.as_bytes(), id, &r), "{text}");
        }
    }

    #[test]
    fn location_query_is_learned() {
        let r = rules();
        assert_eq!(
            id_in_location("http://h/app?_s=LOC1&_k=x#frag", "_s", &r),
            Some("LOC1")
        );
        assert_eq!(id_in_location("/app?_k=1&_s=LOC2", "_s", &r), Some("LOC2"));
        assert_eq!(id_in_location("/app#?_s=NO", "_s", &r), None);
        assert_eq!(id_in_location("/app", "_s", &r), None);
    }

    /// Pieces of markup, well formed or not, to build pages of.
    const PIECES: &[&str] = &[
        "<",
        ">",
        "\"",
        "'",
        "=",
        " ",
        "/",
        "-",
        "!",
        "?",
        "&",
        ";",
        "<!--",
        "-->",
        "<!",
        "</",
        "<a ",
        "href=",
        "src=\"",
        "data-x=",
        "onclick='",
        "title=\"",
        "value=",
        "<script>",
        "</script>",
        "</SCRIPT >",
        "<textarea>",
        "</textarea>",
        "<style>",
        "</style",
        "?_s=",
        "&amp;_s=",
        "_s=",
        "Kd83jHs7",
        "aQ0pLm2x",
        "x",
        "<p>",
        "text ",
        "/>",
        "\"b=",
        " = ",
        "<A ",
        "HREF=",
        "<br/>",
        "<a/b>",
        "\t",
        "\n",
        "=\"",
        "=x>",
        "<script ",
        "</a x='>'>",
        "<!-->",
        "<?",
        "data-",
        "ON",
        "'_s=",
        "&quot;_s=",
    ];

    fn pieces() -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(PIECES), 0..40).prop_map(|p| p.concat())
    }

    /// Splits `page` at `cuts` (offsets past its end are dropped).
    fn split<'a>(page: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().copied().filter(|&c| c < page.len()).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces = Vec::new();
        let mut last = 0;
        for c in cuts {
            pieces.push(&page[last..c]);
            last = c;
        }
        pieces.push(&page[last..]);
        pieces
    }

    /// Markup that shows `?_s=ID` without linking to it.
    fn not_a_link() -> impl Strategy<Value = String> {
        let shown = (0..NOT_LINKS.len()).prop_map(|i| NOT_LINKS[i].to_string());
        prop_oneof![
            shown,
            "[a-z ]{0,20}",
            Just("<a href=\"/static/x.css\">".to_string())
        ]
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_answer(
            page in pieces(),
            cuts in proptest::collection::vec(0usize..400, 0..6),
            limit in 0usize..450,
        ) {
            let page = page.as_bytes();
            let whole = scan_chunks(&[page], limit);
            prop_assert_eq!(scan_chunks(&split(page, &cuts), limit), whole.clone());
            let one_by_one: Vec<&[u8]> = page.chunks(1).collect();
            prop_assert_eq!(scan_chunks(&one_by_one, limit), whole);
        }

        #[test]
        fn the_first_link_is_found_past_anything_shown_however_split(
            shown in proptest::collection::vec(not_a_link(), 0..8),
            link in 0..LINKS.len(),
            id in "[A-Za-z0-9_-]{1,64}",
            cuts in proptest::collection::vec(0usize..1200, 0..6),
        ) {
            let page = format!("{}{}", shown.concat(), LINKS[link].replace("ID", &id));
            let found = scan_chunks(&split(page.as_bytes(), &cuts), 32768);
            prop_assert_eq!(found.as_deref(), Some(id.as_str()), "{}", page);
            let shown_only = shown.concat();
            prop_assert_eq!(scan_chunks(&split(shown_only.as_bytes(), &cuts), 32768), None);
        }
    }
}
