"""Instructor sources of the assignments: complete solutions, each region a student writes marked by
``# BEGIN SOLUTION`` / ``# END SOLUTION``. ``minilora.course.build_student`` cuts those regions out.

These files are Python modules so that ``pip install`` ships them with the package; nothing imports them
as such (the grader loads a file by path).
"""
