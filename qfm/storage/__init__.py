"""Object storage (S3 and S3-compatible stores) through boto3: verified transfers and step folders on S3."""

from qfm.storage.uri import S3Uri, cache_path, is_s3_uri, parse_s3_uri

__all__ = ["S3Uri", "cache_path", "is_s3_uri", "parse_s3_uri"]
