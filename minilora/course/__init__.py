"""Course assignments with an autograder: the instructor sources, a student-version builder and a grader.

    from minilora.course import build_student, grade, format_report
    build_student("all", "student/")                 # solutions cut out; each function raises NotImplementedError
    report = grade("layers", "student/layers.py")    # every graded function against minilora's, float64
    print(format_report(report))                     # item, points, pass/FAIL, feedback; total

Assignments (one graded item per function):
    layers      linear_backward, layernorm_backward, gelu_backward, attention_backward, softmax_cross_entropy
    lora_layer  lora_forward, lora_backward, merge, unmerge
    subspace    fwht, fastfood_project, fastfood_transpose, subspace_loss_and_grad

From the shell: ``python -m minilora.course build all --out student/`` and
``python -m minilora.course grade layers student/layers.py [--json report.json]``.
"""
from .build import ASSIGNMENTS, build_student, source_path, strip_solutions
from .grade import GradeReport, ItemResult, format_report, grade

__all__ = ["ASSIGNMENTS", "GradeReport", "ItemResult", "build_student", "format_report", "grade", "source_path",
           "strip_solutions"]
