"""Producer SDK: publish events to conversations from any Python service (CONTRACT §5).

```python
from producers import Producer
with Producer.from_url("redis://localhost:6379/0") as p:
    p.publish("conv-1", "llm.delta", {"text": "hi"})
```
"""

from broadcaster.backend import Presence
from broadcaster.envelope import PublishRequest, PublishResult
from broadcaster.errors import BackendUnavailable, BroadcasterError, PayloadTooLarge, ValidationError
from producers.errors import PublishForbidden, UnexpectedResponse
from producers.options import ProducerOptions
from producers.producer import AsyncProducer, Producer

__all__ = [
    "AsyncProducer",
    "BackendUnavailable",
    "BroadcasterError",
    "PayloadTooLarge",
    "Presence",
    "Producer",
    "ProducerOptions",
    "PublishForbidden",
    "PublishRequest",
    "PublishResult",
    "UnexpectedResponse",
    "ValidationError",
]
