"""The file service: uploads, downloads, thumbnails, blob storage, ACL by conversation."""
