//! The image pipeline on generated images: sizes, orientation, metadata, and every
//! kind of bad input.

#![allow(clippy::unwrap_used)] // a test crate: a panic is a failed test

use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage, codecs::jpeg::JpegEncoder};
use mobile_media::{ImageError, Rendition, render};

const LIMIT: u64 = 50_000_000;

/// A JPEG whose left half is red and right half blue.
fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let image = RgbImage::from_fn(width, height, |x, _| {
        if x < width / 2 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&DynamicImage::ImageRgb8(image))
        .unwrap();
    out
}

/// `jpeg` with an EXIF segment (APP1) carrying an orientation and a camera make.
fn with_exif(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\x00\x2a\x00\x00\x00\x08"); // big-endian, IFD at 8
    tiff.extend_from_slice(&2u16.to_be_bytes()); // two entries
    // Orientation: SHORT, count 1, value left-justified.
    tiff.extend_from_slice(&[0x01, 0x12, 0x00, 0x03, 0, 0, 0, 1]);
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    // Make: ASCII, count 4, inline "Cam\0".
    tiff.extend_from_slice(&[0x01, 0x0f, 0x00, 0x02, 0, 0, 0, 4]);
    tiff.extend_from_slice(b"Cam\0");
    tiff.extend_from_slice(&[0, 0, 0, 0]); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = vec![0xff, 0xd8, 0xff, 0xe1];
    out.extend_from_slice(&u16::try_from(app1.len() + 2).unwrap().to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// The APPn markers before the image data: where metadata lives.
fn app_markers(jpeg: &[u8]) -> Vec<u8> {
    let mut markers = Vec::new();
    let mut i = 2;
    while i + 4 <= jpeg.len() && jpeg[i] == 0xff {
        let marker = jpeg[i + 1];
        if marker == 0xda {
            break; // start of scan
        }
        if (0xe0..=0xef).contains(&marker) {
            markers.push(marker);
        }
        let length = usize::from(u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]));
        i += 2 + length;
    }
    markers
}

fn sizes(renditions: &[Rendition]) -> Vec<(&str, u32, u32)> {
    renditions
        .iter()
        .map(|r| (r.name, r.width, r.height))
        .collect()
}

fn decoded(rendition: &Rendition) -> DynamicImage {
    let image = image::load_from_memory(&rendition.bytes).unwrap();
    assert_eq!(
        (image.width(), image.height()),
        (rendition.width, rendition.height)
    );
    image
}

#[test]
fn a_photo_gets_three_variants_on_the_long_edge() {
    let renditions = render(&jpeg(3000, 2000), LIMIT, 80).unwrap();
    assert_eq!(
        sizes(&renditions),
        vec![
            ("large", 2048, 1365),
            ("medium", 1024, 683),
            ("thumb", 256, 171)
        ]
    );
    for rendition in &renditions {
        assert_eq!(rendition.content_type, "image/jpeg");
        assert_eq!(
            image::guess_format(&rendition.bytes).unwrap(),
            ImageFormat::Jpeg
        );
        decoded(rendition);
    }
}

#[test]
fn small_images_are_never_upscaled() {
    let renditions = render(&jpeg(100, 50), LIMIT, 80).unwrap();
    assert_eq!(
        sizes(&renditions),
        vec![("large", 100, 50), ("medium", 100, 50), ("thumb", 100, 50)]
    );
}

#[test]
fn exif_orientation_is_applied_and_metadata_stripped() {
    let original = with_exif(&jpeg(3000, 1000), 6); // "rotate 90° clockwise to display"
    assert!(app_markers(&original).contains(&0xe1));
    let renditions = render(&original, LIMIT, 80).unwrap();
    assert_eq!(
        sizes(&renditions),
        vec![
            ("large", 683, 2048),
            ("medium", 342, 1024),
            ("thumb", 86, 256)
        ]
    );
    for rendition in &renditions {
        assert!(
            !app_markers(&rendition.bytes).contains(&0xe1),
            "{}: no EXIF segment",
            rendition.name
        );
        assert!(!rendition.bytes.windows(4).any(|w| w == b"Exif"));
    }
    // The original's left (red) edge is now the top.
    let large = decoded(&renditions[0]).into_rgb8();
    let top = large.get_pixel(341, 10).0;
    let bottom = large.get_pixel(341, 2037).0;
    assert!(top[0] > 200 && top[2] < 60, "top is red: {top:?}");
    assert!(
        bottom[2] > 200 && bottom[0] < 60,
        "bottom is blue: {bottom:?}"
    );
}

#[test]
fn transparency_keeps_png_and_opaque_alpha_becomes_jpeg() {
    let encode = |image: RgbaImage| {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let see_through = encode(RgbaImage::from_fn(600, 400, |x, _| {
        Rgba([0, 128, 0, if x < 300 { 0 } else { 255 }])
    }));
    let renditions = render(&see_through, LIMIT, 80).unwrap();
    assert!(renditions.iter().all(|r| r.content_type == "image/png"));
    assert!(decoded(&renditions[2]).color().has_alpha());

    let opaque = encode(RgbaImage::from_fn(600, 400, |_, _| Rgba([0, 128, 0, 255])));
    let renditions = render(&opaque, LIMIT, 80).unwrap();
    assert!(renditions.iter().all(|r| r.content_type == "image/jpeg"));
}

#[test]
fn webp_is_accepted() {
    let mut out = std::io::Cursor::new(Vec::new());
    RgbImage::from_pixel(500, 300, Rgb([10, 20, 30]))
        .write_to(&mut out, ImageFormat::WebP)
        .unwrap();
    let renditions = render(&out.into_inner(), LIMIT, 80).unwrap();
    assert_eq!(renditions[2].width, 256);
}

/// A PNG whose header claims `width` × `height` but holds almost nothing: a
/// decompression bomb's signature.
fn png_claiming(width: u32, height: u32, idat: bool) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&13u32.to_be_bytes());
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&ihdr);
    png.extend_from_slice(&chunk);
    png.extend_from_slice(&crc32fast::hash(&chunk).to_be_bytes());
    if idat {
        // A few bytes of zlib stream: a real bomb's data is a small, very compressible
        // stream that would inflate to the claimed size.
        let data = [0x78, 0xda, 0xed, 0xc1, 0x01, 0x01, 0x00, 0x00];
        png.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        let mut chunk = b"IDAT".to_vec();
        chunk.extend_from_slice(&data);
        png.extend_from_slice(&chunk);
        png.extend_from_slice(&crc32fast::hash(&chunk).to_be_bytes());
    }
    png.extend_from_slice(&[0, 0, 0, 0]);
    png.extend_from_slice(b"IEND");
    png.extend_from_slice(&crc32fast::hash(b"IEND").to_be_bytes());
    png
}

#[test]
fn every_bad_image_fails_with_a_reason() {
    let photo = jpeg(800, 600);
    let mut png = std::io::Cursor::new(Vec::new());
    RgbImage::from_fn(300, 300, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 7]))
        .write_to(&mut png, ImageFormat::Png)
        .unwrap();
    let png = png.into_inner();
    // An EXIF thumbnail carries its own end marker: it must not hide a truncation.
    let thumbnail = jpeg(16, 16);
    let mut with_thumbnail = vec![0xff, 0xd8, 0xff, 0xe1];
    with_thumbnail.extend_from_slice(&u16::try_from(thumbnail.len() + 8).unwrap().to_be_bytes());
    with_thumbnail.extend_from_slice(b"Exif\0\0");
    with_thumbnail.extend_from_slice(&thumbnail);
    with_thumbnail.extend_from_slice(&photo[2..photo.len() / 2]);
    type Expected = fn(&ImageError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Expected)> = vec![
        ("zero bytes", Vec::new(), |e| *e == ImageError::Empty),
        ("text", b"hello, this is not an image".to_vec(), |e| {
            *e == ImageError::UnsupportedFormat
        }),
        (
            "a GIF",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
            |e| *e == ImageError::UnsupportedFormat,
        ),
        ("a truncated JPEG", photo[..photo.len() / 2].to_vec(), |e| {
            matches!(e, ImageError::Corrupt(_))
        }),
        (
            "a truncated JPEG with an EXIF thumbnail",
            with_thumbnail,
            |e| matches!(e, ImageError::Corrupt(_)),
        ),
        ("a truncated PNG", png[..png.len() / 2].to_vec(), |e| {
            matches!(e, ImageError::Corrupt(_))
        }),
        (
            "a JPEG header then noise",
            [&photo[..20], &[0x5a; 4000][..]].concat(),
            |e| matches!(e, ImageError::Corrupt(_)),
        ),
        (
            "a PNG claiming 100,000 × 100,000 pixels",
            png_claiming(100_000, 100_000, true),
            |e| {
                matches!(
                    e,
                    ImageError::TooManyPixels {
                        width: 100_000,
                        height: 100_000,
                        ..
                    }
                )
            },
        ),
        (
            "a PNG with a header and no pixels",
            png_claiming(64, 64, false),
            |e| matches!(e, ImageError::Corrupt(_)),
        ),
    ];
    for (what, bytes, expected) in cases {
        let error = render(&bytes, LIMIT, 80)
            .map(|r| sizes(&r).len())
            .expect_err(what);
        assert!(expected(&error), "{what}: {error:?}");
        assert!(!error.to_string().is_empty());
    }
}

#[test]
fn the_pixel_limit_is_checked_before_decoding() {
    let error = render(&jpeg(1000, 1000), 999_999, 80).unwrap_err();
    assert_eq!(
        error,
        ImageError::TooManyPixels {
            width: 1000,
            height: 1000,
            limit: 999_999
        }
    );
}
