"""Course assignments with an autograder: the instructor sources, a student-version builder and a grader.

    from minilora.course import build_student, grade, format_report
    build_student("all", "student/")                 # solutions cut out; each function raises NotImplementedError
    report = grade("layers", "student/layers.py")    # each item in a child process, against minilora's reference
    print(format_report(report))                     # item, points, pass/FAIL, feedback; total

Assignments (one graded item per function):
    layers      linear_backward, layernorm_backward, gelu_backward, attention_backward, softmax_cross_entropy
    lora_layer  lora_forward, lora_backward, merge, unmerge
    subspace    fwht, fastfood_project, fastfood_transpose, subspace_loss_and_grad

From the shell: ``python -m minilora.course build all --out student/`` (``--gradescope-zip FILE.zip`` for
Gradescope's autograder bundle) and ``python -m minilora.course grade layers student/layers.py`` (a .py or .ipynb
file; ``--json report.json``, ``--gradescope results.json``, ``--timeout``, ``--memory-mb``).
"""
from .build import ASSIGNMENTS, build_student, source_path, strip_solutions
from .grade import GradeReport, ItemResult, format_report, grade

__all__ = ["ASSIGNMENTS", "GradeReport", "ItemResult", "build_student", "format_report", "grade", "source_path",
           "strip_solutions"]
