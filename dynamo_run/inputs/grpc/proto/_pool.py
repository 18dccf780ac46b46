"""The descriptor pool of the KServe messages: private, so that tritonclient (which registers
the same ``inference.*`` names in protobuf's default pool) can be imported beside them."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
