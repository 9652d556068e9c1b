//! File-name parsing for the Market-1501, DukeMTMC-reID and MSMT17 naming schemes.

/// What a dataset file name encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedName {
    /// Identity as written (-1 junk, 0 distractor on Market-1501).
    pub pid: i64,
    /// Camera as written (1-based in both layouts).
    pub camera: i64,
    /// Frame number.
    pub frame: i64,
}

fn parse_pid(s: &str) -> Option<i64> {
    if s == "-1" {
        return Some(-1);
    }
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Splits `stem` into the identity and the rest at the first `_`.
fn split_pid(stem: &str) -> Option<(i64, &str)> {
    let (pid, rest) = stem.split_once('_')?;
    Some((parse_pid(pid)?, rest))
}

/// Parses a Market-1501 name such as `0002_c1s1_000451_03.jpg` or
/// `-1_c3s2_012345_01.jpg` (identity, camera 1-6, sequence, frame, box index).
pub fn parse_market1501(file_name: &str) -> Option<ParsedName> {
    let stem = file_name.rsplit_once('.').map_or(file_name, |(s, _)| s);
    let (pid, rest) = split_pid(stem)?;
    let mut parts = rest.split('_');
    let cam_seq = parts.next()?;
    let frame = digits(parts.next()?)?;
    let _box_index = digits(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    let cam_seq = cam_seq.strip_prefix('c')?;
    let (camera, sequence) = cam_seq.split_once('s')?;
    let camera = digits(camera)?;
    digits(sequence)?;
    Some(ParsedName { pid, camera, frame })
}

/// Parses a DukeMTMC-reID name such as `0001_c2_f0046182.jpg`.
pub fn parse_dukemtmc(file_name: &str) -> Option<ParsedName> {
    let stem = file_name.rsplit_once('.').map_or(file_name, |(s, _)| s);
    let (pid, rest) = split_pid(stem)?;
    let (camera, frame) = rest.split_once('_')?;
    let camera = digits(camera.strip_prefix('c')?)?;
    let frame = digits(frame.strip_prefix('f')?)?;
    Some(ParsedName { pid, camera, frame })
}

/// Formats a Market-1501 file name; the inverse of [`parse_market1501`].
pub fn format_market1501(pid: i64, camera: i64, sequence: i64, frame: i64, index: i64) -> String {
    let pid = if pid < 0 { "-1".to_string() } else { format!("{pid:04}") };
    format!("{pid}_c{camera}s{sequence}_{frame:06}_{index:02}.jpg")
}

/// Formats a DukeMTMC-reID file name; the inverse of [`parse_dukemtmc`].
pub fn format_dukemtmc(pid: i64, camera: i64, frame: i64) -> String {
    let pid = if pid < 0 { "-1".to_string() } else { format!("{pid:04}") };
    format!("{pid}_c{camera}_f{frame:07}.jpg")
}

/// The camera (1-based) of an MSMT17 name such as `0000_000_01_0303morning_0015_0.jpg`:
/// its third `_` field, as torchreid reads it. The identity comes from the list
/// files, not the name.
pub fn parse_msmt17_camera(file_name: &str) -> Option<i64> {
    let mut fields = file_name.split('_');
    digits(fields.next()?)?;
    digits(fields.next()?)?;
    let camera = digits(fields.next()?)?;
    fields.next()?;
    Some(camera)
}

/// Formats an MSMT17 file name: identity, its image index, camera, a date-and-time
/// field and a frame, as in `0000_000_01_0303morning_0015_0.jpg`.
pub fn format_msmt17(pid: i64, index: usize, camera: i64, frame: i64) -> String {
    format!("{pid:04}_{index:03}_{camera:02}_0113morning_{frame:04}_0.jpg")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn market_names() {
        let p = parse_market1501("0002_c1s1_000451_03.jpg").unwrap();
        assert_eq!((p.pid, p.camera, p.frame), (2, 1, 451));
        let junk = parse_market1501("-1_c3s2_012345_01.jpg").unwrap();
        assert_eq!((junk.pid, junk.camera, junk.frame), (-1, 3, 12345));
        let distractor = parse_market1501("0000_c6s4_002202_00.jpg").unwrap();
        assert_eq!((distractor.pid, distractor.camera), (0, 6));
    }

    #[test]
    fn malformed_market_names() {
        for bad in [
            "Thumbs.db",
            "0002_c1_000451_03.jpg",
            "0002_c1s1_000451.jpg",
            "abcd_c1s1_000451_03.jpg",
            "-2_c1s1_000451_03.jpg",
            "0002_x1s1_000451_03.jpg",
            "0002_c1s1_000451_03_7.jpg",
            "0002_cs1_000451_03.jpg",
            "",
        ] {
            assert_eq!(parse_market1501(bad), None, "{bad}");
        }
    }

    #[test]
    fn duke_names() {
        let p = parse_dukemtmc("0001_c2_f0046182.jpg").unwrap();
        assert_eq!((p.pid, p.camera, p.frame), (1, 2, 46182));
        assert_eq!(parse_dukemtmc("0001_c2_0046182.jpg"), None);
        assert_eq!(parse_dukemtmc("0001_2_f0046182.jpg"), None);
        assert_eq!(parse_dukemtmc("x_c2_f1.jpg"), None);
    }

    #[test]
    fn msmt17_names_give_the_camera_of_their_third_field() {
        assert_eq!(parse_msmt17_camera("0000_000_01_0303morning_0015_0.jpg"), Some(1));
        assert_eq!(parse_msmt17_camera("3059_012_15_0113noon_1010_1.jpg"), Some(15));
        assert_eq!(parse_msmt17_camera(&format_msmt17(7, 3, 12, 99)), Some(12));
        for bad in [
            "0000_000_0303morning.jpg",
            "0000_000_x1_a_b.jpg",
            "0000.jpg",
            "a_000_01_b.jpg",
        ] {
            assert_eq!(parse_msmt17_camera(bad), None, "{bad}");
        }
    }

    #[test]
    fn duke_format_round_trips() {
        for (pid, cam) in [(-1, 3), (0, 1), (7, 8)] {
            let p = parse_dukemtmc(&format_dukemtmc(pid, cam, 46182)).unwrap();
            assert_eq!((p.pid, p.camera, p.frame), (pid, cam, 46182));
        }
    }

    #[test]
    fn market_format_round_trips() {
        for (pid, cam) in [(-1, 3), (0, 1), (7, 6), (1501, 2)] {
            let name = format_market1501(pid, cam, 2, 1234, 1);
            let p = parse_market1501(&name).unwrap();
            assert_eq!((p.pid, p.camera, p.frame), (pid, cam, 1234));
        }
    }
}
