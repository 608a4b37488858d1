//! The data of the `dates` example, shared with `attention_maps`: dates of the Gregorian
//! calendar written the ways people write them, one character per token.

use vaswani::Result;
use vaswani::models::Seq2SeqBatch;
use vaswani::rand::{Rng, rngs::StdRng};

pub const PAD: usize = 0;
pub const BOS: usize = 1;
pub const EOS: usize = 2;
pub const SPECIALS: usize = 3;
/// The characters are printable ASCII, ' ' to '~'; the vocabulary is those plus PAD, BOS, EOS.
pub const VOCAB: usize = SPECIALS + 95;
/// `YYYY-MM-DD`.
pub const ISO_LEN: usize = 10;
/// One held-out date in `UNSEEN_EVERY` is written in an unseen format.
pub const UNSEEN_EVERY: usize = 4;

// ---------------------------------------------------------------------------------------
// Calendar

pub const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
pub const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A day of the Gregorian calendar; `month` and `day` count from 1, `weekday` from Monday = 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Date {
    pub year: u32,
    pub month: u32,
    pub day: u32,
    pub weekday: usize,
}

impl Date {
    pub fn iso(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

pub fn is_leap(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

pub fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Every day from 1900-01-01 (a Monday) to 2099-12-31, in order.
pub fn calendar() -> Vec<Date> {
    let mut days = Vec::with_capacity(73_049);
    for year in 1900..=2099 {
        for month in 1..=12 {
            for day in 1..=days_in_month(year, month) {
                let weekday = days.len() % 7;
                days.push(Date {
                    year,
                    month,
                    day,
                    weekday,
                });
            }
        }
    }
    days
}

/// Whether day `index` of the calendar is kept for evaluation (1 in 20, by a hash of the
/// day and the seed; splitmix64's finaliser).
pub fn reserved_for_evaluation(index: usize, seed: u64) -> bool {
    let mut z = (index as u64 ^ seed.rotate_left(32)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).is_multiple_of(20)
}

// ---------------------------------------------------------------------------------------
// Formats

/// A way of writing a date. Each renders with random variation (case, zeros, commas).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// 28/11/2026
    SlashDmy,
    /// 28.11.2026
    DotDmy,
    /// 28-11-2026
    DashDmy,
    /// 2026/11/28
    SlashYmd,
    /// 2026.11.28
    DotYmd,
    /// 2026-11-28
    Iso,
    /// 28 November 2026
    DayMonth,
    /// 28 Nov 2026
    DayMon,
    /// November 28, 2026
    MonthDay,
    /// Nov 28, 2026
    MonDay,
    /// November 28th, 2026
    MonthOrd,
    /// 28th of November 2026
    OrdOfMonth,
    /// 28th November 2026
    OrdMonth,
    /// Saturday, November 28, 2026
    WeekdayMonthDay,
    /// Saturday, Nov 28, 2026
    WeekdayMonDay,
    /// Saturday, November 28th, 2026
    WeekdayMonthOrd,
    /// Saturday, 28th of November 2026
    WeekdayOrdOfMonth,
    /// Sat, 28 Nov 2026
    WkdDayMon,
    /// Saturday 28 November 2026
    WeekdayDayMonth,
    /// Sat 28 November 2026
    WkdDayMonth,
    /// 28-Nov-2026
    DashDayMon,
    /// Sat Nov 28 2026
    WkdMonDay,
    // Never in training:
    /// Nov 28th, 2026: the abbreviated month with an ordinal day (seen: November 28th, 2026
    /// and Nov 28, 2026).
    MonOrd,
    /// 28th Nov 2026: ordinal day, abbreviated month (seen: 28th November 2026, 28 Nov 2026).
    OrdMon,
    /// Sat, November 28, 2026: abbreviated weekday before the full month, month first
    /// (seen: Saturday, November 28, 2026 and Sat 28 November 2026).
    WkdMonthDay,
    /// 28/Nov/2026: the abbreviated month between slashes (seen: 28-Nov-2026 and
    /// 28/11/2026).
    SlashDayMon,
}

/// The formats of training.
pub const SEEN: [Format; 22] = [
    Format::SlashDmy,
    Format::DotDmy,
    Format::DashDmy,
    Format::SlashYmd,
    Format::DotYmd,
    Format::Iso,
    Format::DayMonth,
    Format::DayMon,
    Format::MonthDay,
    Format::MonDay,
    Format::MonthOrd,
    Format::OrdOfMonth,
    Format::OrdMonth,
    Format::WeekdayMonthDay,
    Format::WeekdayMonDay,
    Format::WeekdayMonthOrd,
    Format::WeekdayOrdOfMonth,
    Format::WkdDayMon,
    Format::WeekdayDayMonth,
    Format::WkdDayMonth,
    Format::DashDayMon,
    Format::WkdMonDay,
];

/// The formats that only the held-out set uses: each pairs pieces that training shows, but
/// never together.
///
/// No numeric order is held out. When dots separated only day-first dates in training, the
/// held-out 2026.11.28 came out right 71% to 100% of the time depending on the seed: the
/// data then said that a dot means day first, and the model could not know better. Here
/// every separator (/ . -) comes in both orders, so the position of the four-digit year is
/// what decides.
pub const UNSEEN: [Format; 4] = [
    Format::MonOrd,
    Format::OrdMon,
    Format::WkdMonthDay,
    Format::SlashDayMon,
];

impl Format {
    /// 2026-11-28 (a Saturday) in this format, without variation.
    pub fn example(self) -> &'static str {
        use Format::*;
        match self {
            SlashDmy => "28/11/2026",
            DotDmy => "28.11.2026",
            DashDmy => "28-11-2026",
            SlashYmd => "2026/11/28",
            DotYmd => "2026.11.28",
            Iso => "2026-11-28",
            DayMonth => "28 November 2026",
            DayMon => "28 Nov 2026",
            MonthDay => "November 28, 2026",
            MonDay => "Nov 28, 2026",
            MonthOrd => "November 28th, 2026",
            OrdOfMonth => "28th of November 2026",
            OrdMonth => "28th November 2026",
            WeekdayMonthDay => "Saturday, November 28, 2026",
            WeekdayMonDay => "Saturday, Nov 28, 2026",
            WeekdayMonthOrd => "Saturday, November 28th, 2026",
            WeekdayOrdOfMonth => "Saturday, 28th of November 2026",
            WkdDayMon => "Sat, 28 Nov 2026",
            WeekdayDayMonth => "Saturday 28 November 2026",
            WkdDayMonth => "Sat 28 November 2026",
            DashDayMon => "28-Nov-2026",
            WkdMonDay => "Sat Nov 28 2026",
            MonOrd => "Nov 28th, 2026",
            OrdMon => "28th Nov 2026",
            WkdMonthDay => "Sat, November 28, 2026",
            SlashDayMon => "28/Nov/2026",
        }
    }

    /// `date` written in this format, with random variation drawn from `rng`.
    pub fn render(self, date: &Date, rng: &mut StdRng) -> String {
        use Format::*;
        let y = date.year;
        let month = MONTHS[date.month as usize - 1];
        let weekday = WEEKDAYS[date.weekday];
        let wkd = &weekday[..3];
        // Numbers: both day and month zero-padded, or neither (ISO always).
        let padded = rng.random_bool(0.5);
        let (d, m) = (number(date.day, padded), number(date.month, padded));
        // Day in words: a leading zero now and then ("Nov 05, 2026").
        let day = number(date.day, rng.random_bool(0.1));
        let ord = ordinal(date.day);
        let mon = month_abbr(date.month, rng);
        // No "Nov." between dashes or slashes.
        let mon_dotless = mon.trim_end_matches('.');
        let comma = if rng.random_bool(0.75) { "," } else { "" };
        // "28th of November, 2026" now and then.
        let of_comma = if rng.random_bool(0.25) { "," } else { "" };
        let text = match self {
            SlashDmy => format!("{d}/{m}/{y}"),
            DotDmy => format!("{d}.{m}.{y}"),
            DashDmy => format!("{d}-{m}-{y}"),
            SlashYmd => format!("{y}/{m}/{d}"),
            DotYmd => format!("{y}.{m}.{d}"),
            Iso => date.iso(),
            DayMonth => format!("{day} {month} {y}"),
            DayMon => format!("{day} {mon} {y}"),
            MonthDay => format!("{month} {day}{comma} {y}"),
            MonDay => format!("{mon} {day}{comma} {y}"),
            MonthOrd => format!("{month} {ord}{comma} {y}"),
            OrdOfMonth => format!("{ord} of {month}{of_comma} {y}"),
            OrdMonth => format!("{ord} {month} {y}"),
            WeekdayMonthDay => format!("{weekday}{comma} {month} {day}{comma} {y}"),
            WeekdayMonDay => format!("{weekday}{comma} {mon} {day}{comma} {y}"),
            WeekdayMonthOrd => format!("{weekday}{comma} {month} {ord}{comma} {y}"),
            WeekdayOrdOfMonth => format!("{weekday}{comma} {ord} of {month}{of_comma} {y}"),
            WkdDayMon => format!("{wkd}{comma} {day} {mon} {y}"),
            WeekdayDayMonth => format!("{weekday}{comma} {day} {month} {y}"),
            WkdDayMonth => format!("{wkd}{comma} {day} {month} {y}"),
            DashDayMon => format!("{day}-{mon_dotless}-{y}"),
            WkdMonDay => format!("{wkd} {mon} {day} {y}"),
            MonOrd => format!("{mon} {ord}{comma} {y}"),
            OrdMon => format!("{ord} {mon} {y}"),
            WkdMonthDay => format!("{wkd}{comma} {month} {day}{comma} {y}"),
            SlashDayMon => format!("{day}/{mon_dotless}/{y}"),
        };
        // Case: as written mostly, sometimes all lower or all upper.
        match rng.random_range(0..10) {
            0..7 => text,
            7..9 => text.to_lowercase(),
            _ => text.to_uppercase(),
        }
    }
}

pub fn number(n: u32, padded: bool) -> String {
    if padded { format!("{n:02}") } else { n.to_string() }
}

/// 1st, 2nd, 3rd, 4th, …, 11th, 12th, 13th, …, 21st, 22nd, 23rd, 24th, …
pub fn ordinal(day: u32) -> String {
    let suffix = match (day % 10, day % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{day}{suffix}")
}

/// "Nov", sometimes "Nov."; "Sep" or "Sept".
pub fn month_abbr(month: u32, rng: &mut StdRng) -> String {
    let name = MONTHS[month as usize - 1];
    let abbr = if month == 9 && rng.random_bool(0.3) {
        "Sept"
    } else {
        &name[..3]
    };
    // "May" is the whole name: no dot after it.
    let dot = if month != 5 && rng.random_bool(0.1) {
        "."
    } else {
        ""
    };
    format!("{abbr}{dot}")
}

pub fn encode(text: &str) -> Vec<usize> {
    text.bytes()
        .map(|c| {
            assert!((b' '..=b'~').contains(&c), "not printable ASCII: {c}");
            SPECIALS + (c - b' ') as usize
        })
        .collect()
}

pub fn decode(ids: &[usize]) -> String {
    ids.iter()
        .map(|&t| match t.checked_sub(SPECIALS) {
            Some(c) if c < 95 => char::from(b' ' + c as u8),
            _ => '?',
        })
        .collect()
}

/// One written date: the text, its ISO form and its format.
pub struct Example {
    pub text: String,
    pub iso: String,
    pub format: Format,
}

impl Example {
    /// A date drawn from `days`, written in a format drawn from `formats`.
    pub fn random(rng: &mut StdRng, days: &[Date], formats: &[Format]) -> Self {
        let date = days[rng.random_range(0..days.len())];
        let format = formats[rng.random_range(0..formats.len())];
        Example {
            text: format.render(&date, rng),
            iso: date.iso(),
            format,
        }
    }

    pub fn unseen(&self) -> bool {
        UNSEEN.contains(&self.format)
    }
}

pub fn examples(rng: &mut StdRng, days: &[Date], formats: &[Format], n: usize) -> Vec<Example> {
    (0..n).map(|_| Example::random(rng, days, formats)).collect()
}

/// `n` held-out examples: every `UNSEEN_EVERY`-th one in an unseen format, the others in
/// the seen formats.
pub fn held_out_examples(rng: &mut StdRng, days: &[Date], n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let unseen = i % UNSEEN_EVERY == UNSEEN_EVERY - 1;
            Example::random(rng, days, if unseen { &UNSEEN } else { &SEEN })
        })
        .collect()
}

pub fn batch(examples: &[Example]) -> Result<Seq2SeqBatch> {
    let pairs: Vec<(Vec<usize>, Vec<usize>)> = examples
        .iter()
        .map(|e| (encode(&e.text), encode(&e.iso)))
        .collect();
    Seq2SeqBatch::from_pairs(&pairs, BOS, EOS, PAD)
}
