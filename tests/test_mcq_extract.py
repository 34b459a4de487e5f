"""Answer extraction cascade on a table of real-looking MLLM answers."""

import pytest
import torch

from mgll.mllm_eval.extract import extract_answer

torch.set_num_threads(1)

OPTIONS = ["glaucoma", "cataract", "age-related macular degeneration", "diabetic retinopathy"]

TABLE = [
    ("B", 1, "letter"),
    ("b", 1, "letter"),
    ("B.", 1, "letter"),
    ("(B)", 1, "letter"),
    (" D ", 3, "letter"),
    ("**B**", 1, "letter"),
    ("The answer is **C**.", 2, "answer_is"),
    ("The answer is B", 1, "answer_is"),
    ("The answer is (C).", 2, "answer_is"),
    ("Answer: B) cataract", 1, "answer_is"),
    ("answer: d", 3, "answer_is"),
    ("The correct option is A, glaucoma, given the enlarged cup.", 0, "answer_is"),
    ("B) Cataract", 1, "leading_letter"),
    ("C. Age-related macular degeneration", 2, "leading_letter"),
    ("I would pick (D) here.", 3, "paren_letter"),
    ("Cataract", 1, "text"),
    ("The image shows signs of glaucoma.", 0, "text"),
    ("The answer is a cataract.", 1, "text"),  # "a" is the article, not option A
    ("Findings consistent with AMD.", 2, "text"),  # a vocabulary synonym
    ("This fundus shows diabetic retinopathy with microaneurysms", 3, "text"),
    ("A cataract blurs the view.", 1, "text"),  # a sentence starting with the article "A"
    ("Glaucoma or cataract, hard to say.", None, "ambiguous"),
    ("Option A is wrong; the answer is C", None, "ambiguous"),
    ("I cannot determine the disease from this image.", None, "none"),
    ("", None, "none"),
    ("The retina looks tessellated.", None, "none"),  # not one of this question's options
]


@pytest.mark.parametrize("text,index,method", TABLE)
def test_extraction_table(text, index, method):
    got = extract_answer(text, OPTIONS)
    assert (got.index, got.method) == (index, method)
    assert got.ok is (index is not None)


def test_letters_beyond_the_options_are_not_answers():
    assert extract_answer("E", OPTIONS).index is None
    assert extract_answer("The answer is E", OPTIONS).index is None
    assert extract_answer("C", OPTIONS[:2]).index is None
