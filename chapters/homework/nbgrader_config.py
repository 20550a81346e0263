"""nbgrader configuration for the minilora homework (run nbgrader from this directory).

The course root is the directory nbgrader is started in: ``source/<assignment>/`` holds the
instructor notebooks (solutions between the BEGIN/END SOLUTION markers); ``release/``,
``submitted/``, ``autograded/``, ``feedback/`` and ``gradebook.db`` are created next to it and
are not committed.
"""
c = get_config()  # noqa: F821 - nbgrader defines get_config() when it reads this file

c.CourseDirectory.course_id = "minilora"
# each test cell runs in well under a second; a student's infinite loop is cut after a minute
c.Execute.timeout = 60
c.Execute.interrupt_on_timeout = True
