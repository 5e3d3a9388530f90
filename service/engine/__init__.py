"""The engine: one scheduler shares one model among every conversation.

* `api`: what the pipeline submits (`GenerationRequest`, edits) and gets back (`StepSink`);
* `scheduler`: the engine thread, admission by priority class, caps, the watchdog;
* `runner`: the protocol a model implements for the scheduler;
* `lfm2_runner`, `scripted_runner`: the two models;
* `compose`: backend, runner and engine from the server's settings.
"""
