//! The image pipeline: one original in, three variants out.
//!
//! 1. [`inspect`]: sniff the format from the bytes (never the declared type): JPEG,
//!    PNG or WebP; read the dimensions from the header and refuse more than the pixel
//!    limit, before a single pixel is decoded: a 50 KB PNG can claim 100,000 × 100,000
//!    pixels. The API runs this on an upload's first bytes before storing anything;
//!    the worker runs it again on the whole original.
//! 3. Decode once, under the same limit as an allocation cap, and only the first frame.
//! 4. Apply the EXIF orientation, so a portrait photo is portrait.
//! 5. Resize in a cascade with `fast_image_resize` (SIMD): `large` from the original,
//!    `medium` from `large`, `thumb` from `medium`; never upscale.
//! 6. Encode fresh (JPEG, or PNG when the image has real transparency): nothing of the
//!    original's metadata (EXIF, GPS position, camera serial) survives.
//!
//! Everything here is synchronous CPU work: the worker runs it on the blocking pool,
//! bounded by `WORKER_IMAGE_CONCURRENCY`. No I/O: the tests and the benchmark call it
//! directly.

use std::io::Cursor;

use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image};
use image::{
    DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits,
    codecs::{
        jpeg::JpegEncoder,
        png::{CompressionType, PngEncoder},
    },
};

/// The variants, largest first (the order of the cascade), with their long edge.
pub const VARIANTS: [(&str, u32); 3] = [("large", 2048), ("medium", 1024), ("thumb", 256)];

/// Whether `name` is one of the [`VARIANTS`].
pub fn is_variant(name: &str) -> bool {
    VARIANTS.iter().any(|(variant, _)| *variant == name)
}

/// The formats accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    WebP,
}

impl Format {
    pub const ALL: [Self; 3] = [Self::Jpeg, Self::Png, Self::WebP];

    /// The format a declared media type stands for (`image/jpeg`; parameters and
    /// case ignored), if it is one accepted.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        let essence = media_type.split(';').next().unwrap_or_default().trim();
        Self::ALL
            .into_iter()
            .find(|format| essence.eq_ignore_ascii_case(format.media_type()))
    }

    pub const fn media_type(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::WebP => "image/webp",
        }
    }

    const fn image_format(self) -> ImageFormat {
        match self {
            Self::Jpeg => ImageFormat::Jpeg,
            Self::Png => ImageFormat::Png,
            Self::WebP => ImageFormat::WebP,
        }
    }
}

/// What an image's first bytes say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inspection {
    /// The format its magic bytes are.
    pub format: Format,
    /// Its size, if its header lies within the bytes inspected (within the limit).
    pub dimensions: Option<(u32, u32)>,
}

/// Inspects an image before anything is decoded: its format from its magic bytes, and
/// its dimensions from its header, refused when they exceed `max_pixels`. `bytes` may
/// be only the image's beginning: a header that does not fit in it gives no
/// dimensions.
pub fn inspect(bytes: &[u8], max_pixels: u64) -> Result<Inspection, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = sniff(bytes).ok_or(ImageError::UnsupportedFormat)?;
    let dimensions = ImageReader::with_format(Cursor::new(bytes), format.image_format())
        .into_dimensions()
        .ok();
    if let Some((width, height)) = dimensions
        && u64::from(width) * u64::from(height) > max_pixels
    {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            limit: max_pixels,
        });
    }
    Ok(Inspection { format, dimensions })
}

/// One encoded variant.
#[derive(Debug, Clone)]
pub struct Rendition {
    pub name: &'static str,
    pub width: u32,
    pub height: u32,
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

/// Why an image cannot be processed. Every case is final: the same bytes fail the
/// same way every time, so the job is not retried and the media is marked `failed`
/// with this as its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("the file is empty")]
    Empty,
    #[error("not a JPEG, PNG or WebP image")]
    UnsupportedFormat,
    #[error("the image is {width}×{height} pixels; the limit is {limit} pixels")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
}

/// Decodes `original` and renders every variant.
pub fn render(original: &[u8], max_pixels: u64, quality: u8) -> Result<Vec<Rendition>, ImageError> {
    let image = decode(original, max_pixels)?;
    let mut renditions = Vec::with_capacity(VARIANTS.len());
    let mut resizer = Resizer::new();
    let mut source = Pixels::from(image);
    for (name, long_edge) in VARIANTS {
        let (width, height) = fit(source.width, source.height, long_edge);
        if (width, height) != (source.width, source.height) {
            source = source.resize(&mut resizer, width, height)?;
        }
        renditions.push(Rendition {
            name,
            width,
            height,
            content_type: source.content_type(),
            bytes: source.encode(quality)?,
        });
    }
    Ok(renditions)
}

/// Checks and decodes a whole original, returning the image upright.
pub fn decode(original: &[u8], max_pixels: u64) -> Result<DynamicImage, ImageError> {
    let Inspection { format, dimensions } = inspect(original, max_pixels)?;
    if dimensions.is_none() {
        return Err(ImageError::Corrupt(
            "the image's header cannot be read".to_owned(),
        ));
    }
    if format == Format::Jpeg && !jpeg_is_complete(original) {
        // The JPEG decoder fills a missing tail with grey rather than failing.
        return Err(ImageError::Corrupt("the JPEG is truncated".to_owned()));
    }
    let mut reader = ImageReader::with_format(Cursor::new(original), format.image_format());
    let mut limits = Limits::default();
    // RGBA at 8 bits per channel, plus the decoder's working memory.
    limits.max_alloc = Some(max_pixels.saturating_mul(4).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|e| ImageError::Corrupt(e.to_string()))?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Whether a JPEG's image data ends with its end-of-image marker: walk the segments
/// to the first top-level start-of-scan (so an EXIF thumbnail's own markers do not
/// count), then look for `FF D9` in what follows. Inside entropy-coded data a `FF`
/// byte is always followed by `00` or a restart marker, so only a real end matches.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xff {
            return false;
        }
        let marker = bytes[i + 1];
        match marker {
            0xff => i += 1, // fill byte
            0x01 | 0xd0..=0xd7 => i += 2,
            _ => {
                let length = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
                let next = i + 2 + length;
                if marker == 0xda {
                    return bytes
                        .get(next..)
                        .is_some_and(|data| data.windows(2).any(|w| w == [0xff, 0xd9]));
                }
                i = next;
            }
        }
    }
    false
}

/// The format the bytes are, whatever they are called.
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    match image::guess_format(bytes).ok()? {
        ImageFormat::Jpeg => Some(Format::Jpeg),
        ImageFormat::Png => Some(Format::Png),
        ImageFormat::WebP => Some(Format::WebP),
        _ => None,
    }
}

/// The size that fits `long_edge`, keeping the aspect ratio; never larger than the source.
pub fn fit(width: u32, height: u32, long_edge: u32) -> (u32, u32) {
    let long = width.max(height);
    if long <= long_edge {
        return (width, height);
    }
    let scale = |side: u32| {
        let scaled =
            (u64::from(side) * u64::from(long_edge) + u64::from(long) / 2) / u64::from(long);
        u32::try_from(scaled).unwrap_or(u32::MAX).max(1)
    };
    (scale(width), scale(height))
}

/// Decoded pixels: RGB, or RGBA when some pixel is not fully opaque.
struct Pixels {
    width: u32,
    height: u32,
    alpha: bool,
    data: Vec<u8>,
}

impl From<DynamicImage> for Pixels {
    fn from(image: DynamicImage) -> Self {
        let (width, height) = (image.width(), image.height());
        if image.color().has_alpha() {
            let rgba = image.into_rgba8();
            if rgba.pixels().any(|p| p.0[3] != u8::MAX) {
                return Self {
                    width,
                    height,
                    alpha: true,
                    data: rgba.into_raw(),
                };
            }
            let rgb = DynamicImage::ImageRgba8(rgba).into_rgb8();
            return Self {
                width,
                height,
                alpha: false,
                data: rgb.into_raw(),
            };
        }
        Self {
            width,
            height,
            alpha: false,
            data: image.into_rgb8().into_raw(),
        }
    }
}

impl Pixels {
    fn pixel_type(&self) -> PixelType {
        if self.alpha {
            PixelType::U8x4
        } else {
            PixelType::U8x3
        }
    }

    fn content_type(&self) -> &'static str {
        if self.alpha {
            "image/png"
        } else {
            "image/jpeg"
        }
    }

    fn resize(&self, resizer: &mut Resizer, width: u32, height: u32) -> Result<Self, ImageError> {
        let resize_failed = |e: &dyn std::fmt::Display| ImageError::Corrupt(format!("resize: {e}"));
        let source = fast_image_resize::images::ImageRef::new(
            self.width,
            self.height,
            &self.data,
            self.pixel_type(),
        )
        .map_err(|e| resize_failed(&e))?;
        let mut target = Image::new(width, height, self.pixel_type());
        let options = ResizeOptions::new()
            .resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom))
            .use_alpha(self.alpha);
        resizer
            .resize(&source, &mut target, &options)
            .map_err(|e| resize_failed(&e))?;
        Ok(Self {
            width,
            height,
            alpha: self.alpha,
            data: target.into_vec(),
        })
    }

    fn encode(&self, quality: u8) -> Result<Vec<u8>, ImageError> {
        let mut out = Vec::with_capacity(self.data.len() / 8);
        let result = if self.alpha {
            let encoder = PngEncoder::new_with_quality(
                &mut out,
                CompressionType::Fast,
                image::codecs::png::FilterType::Adaptive,
            );
            image::ImageEncoder::write_image(
                encoder,
                &self.data,
                self.width,
                self.height,
                image::ExtendedColorType::Rgba8,
            )
        } else {
            JpegEncoder::new_with_quality(&mut out, quality).encode(
                &self.data,
                self.width,
                self.height,
                image::ExtendedColorType::Rgb8,
            )
        };
        result.map_err(|e| ImageError::Corrupt(format!("encode: {e}")))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn declared_media_types() {
        assert_eq!(Format::from_media_type("image/jpeg"), Some(Format::Jpeg));
        assert_eq!(
            Format::from_media_type("Image/PNG; charset=binary"),
            Some(Format::Png)
        );
        assert_eq!(Format::from_media_type("image/gif"), None);
        assert!(is_variant("thumb") && !is_variant("huge"));
    }

    #[test]
    fn fit_keeps_the_aspect_ratio_and_never_upscales() {
        assert_eq!(fit(4000, 3000, 2048), (2048, 1536));
        assert_eq!(fit(3000, 4000, 256), (192, 256));
        assert_eq!(fit(100, 50, 256), (100, 50));
        assert_eq!(fit(10_000, 1, 256), (256, 1));
    }
}
