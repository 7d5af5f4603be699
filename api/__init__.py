"""The HTTP front end: validates requests, stores inputs, queues jobs by task name. Never imports torch."""
