"""Lesson 07's seeded test suite: one suite, run at six levels (see ``labkit.lessons.testing``)."""
