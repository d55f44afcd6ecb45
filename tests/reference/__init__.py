"""Float64 numpy references written from the papers' formulas (shared/methods/*.md), independently of kdpipe's
torch code: the golden values of the loss tests are computed here, so each one's origin is committed."""
