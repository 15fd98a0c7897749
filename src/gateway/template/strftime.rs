//! `strftime_now(format)`: the time now as Python's `datetime.now().strftime(format)` writes
//! it on Linux (glibc, "C" locale), for templates that put today's date in the system prompt.
//! The clock is read as UTC: Starling reads no time zone database, and `datetime.now()` is
//! naive, so `%Z` and `%z` are empty as in Python.

use std::time::{SystemTime, UNIX_EPOCH};

const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MONTHS: [&str; 12] = [
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

/// The template function.
pub(super) fn strftime_now(format: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    strftime(format, i64::try_from(now).unwrap_or(i64::MAX))
}

/// A broken-down UTC time.
struct Civil {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    /// 0 is Sunday.
    weekday: u32,
    /// 1..=366
    yday: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

fn civil(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400) as u32;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const BEFORE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = BEFORE[month as usize - 1] + day + u32::from(leap && month > 2);
    Civil {
        year,
        month,
        day,
        weekday: (days + 4).rem_euclid(7) as u32,
        yday,
        hour: rem / 3600,
        minute: rem / 60 % 60,
        second: rem % 60,
    }
}

/// Formats `secs` since the epoch (UTC). Unknown directives are kept as written, as glibc
/// does; `%-d` (a glibc extension Python passes through) drops the padding.
pub(super) fn strftime(format: &str, secs: i64) -> String {
    let t = civil(secs);
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.next_if_eq(&'-').is_some();
        let Some(d) = chars.next() else {
            out.push('%');
            if unpadded {
                out.push('-');
            }
            break;
        };
        let num = |out: &mut String, n: i64, width: usize, pad: char| {
            let s = n.to_string();
            if !unpadded {
                for _ in s.len()..width {
                    out.push(pad);
                }
            }
            out.push_str(&s);
        };
        let hour12 = if t.hour.is_multiple_of(12) { 12 } else { t.hour % 12 };
        match d {
            'a' => out.push_str(&DAYS[t.weekday as usize][..3]),
            'A' => out.push_str(DAYS[t.weekday as usize]),
            'b' | 'h' => out.push_str(&MONTHS[t.month as usize - 1][..3]),
            'B' => out.push_str(MONTHS[t.month as usize - 1]),
            'd' => num(&mut out, t.day.into(), 2, '0'),
            'e' => num(&mut out, t.day.into(), 2, ' '),
            'H' => num(&mut out, t.hour.into(), 2, '0'),
            'I' => num(&mut out, hour12.into(), 2, '0'),
            'j' => num(&mut out, t.yday.into(), 3, '0'),
            'm' => num(&mut out, t.month.into(), 2, '0'),
            'M' => num(&mut out, t.minute.into(), 2, '0'),
            'S' => num(&mut out, t.second.into(), 2, '0'),
            'p' => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            'y' => num(&mut out, t.year.rem_euclid(100), 2, '0'),
            'Y' => num(&mut out, t.year, 1, '0'),
            'u' => num(&mut out, if t.weekday == 0 { 7 } else { t.weekday.into() }, 1, '0'),
            'w' => num(&mut out, t.weekday.into(), 1, '0'),
            'F' => out.push_str(&strftime("%Y-%m-%d", secs)),
            'T' | 'X' => out.push_str(&strftime("%H:%M:%S", secs)),
            'D' | 'x' => out.push_str(&strftime("%m/%d/%y", secs)),
            'R' => out.push_str(&strftime("%H:%M", secs)),
            'c' => out.push_str(&strftime("%a %b %e %H:%M:%S %Y", secs)),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            'Z' | 'z' => {}
            other => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected strings are Python's `datetime.fromtimestamp(ts, timezone.utc)
    /// .replace(tzinfo=None).strftime(...)` on Linux.
    #[test]
    fn formats_like_python_on_linux() {
        let f = "%d %b %Y|%a %A %B %h|%H:%M:%S %I %p|%j %m %y %Y|%e|%-d %-m|%F %T %D %R|%u %w|%Z|%z|%c|%x %X|%%|%Q";
        let cases = [
            (
                1_722_000_309,
                "26 Jul 2024|Fri Friday July Jul|13:25:09 01 PM|208 07 24 2024|26|26 7|2024-07-26 13:25:09 07/26/24 13:25|5 5|||Fri Jul 26 13:25:09 2024|07/26/24 13:25:09|%|%Q",
            ),
            (
                0,
                "01 Jan 1970|Thu Thursday January Jan|00:00:00 12 AM|001 01 70 1970| 1|1 1|1970-01-01 00:00:00 01/01/70 00:00|4 4|||Thu Jan  1 00:00:00 1970|01/01/70 00:00:00|%|%Q",
            ),
            (
                1_735_689_599,
                "31 Dec 2024|Tue Tuesday December Dec|23:59:59 11 PM|366 12 24 2024|31|31 12|2024-12-31 23:59:59 12/31/24 23:59|2 2|||Tue Dec 31 23:59:59 2024|12/31/24 23:59:59|%|%Q",
            ),
            (
                951_868_799,
                "29 Feb 2000|Tue Tuesday February Feb|23:59:59 11 PM|060 02 00 2000|29|29 2|2000-02-29 23:59:59 02/29/00 23:59|2 2|||Tue Feb 29 23:59:59 2000|02/29/00 23:59:59|%|%Q",
            ),
        ];
        for (secs, want) in cases {
            assert_eq!(strftime(f, secs), want, "{secs}");
        }
    }

    #[test]
    fn now_is_a_plausible_date() {
        let year: i64 = strftime_now("%Y").parse().unwrap();
        assert!((2024..3000).contains(&year), "{year}");
    }
}
