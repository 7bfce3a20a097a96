"""Tests that the READMEs tell the truth and keep the learner's path: short, in the same sections
in both languages, their tables of fixes agree and each row's patch names tests that exist, every
picture they show is there, and every train.py command they show parses."""
import re
import shlex
import unittest

import degradation
import options
import predict
from test_helpers import HERE

READMES = ('README.md', 'README.ja.md')


def read(name):
    return (HERE / name).read_text(encoding='utf-8')


SECTIONS = ('What this is', 'Set up and run', 'What you will see', 'Read it beside the article',
            "The article's code, corrected", 'Deeper plain nets train worse; shortcuts fix that',
            'Next steps', 'Troubleshooting', 'Glossary')


def fix_rows(text):
    """The row numbers of the tables of fixes: the rows that start '| N |'."""
    return [int(m) for m in re.findall(r'^\| (\d+) \|', text, re.M)]


def patch_tests(n):
    """The tests that .ci/article-patches/NN-*.patch names on its first line."""
    patches = sorted((HERE / '.ci' / 'article-patches').glob(f'{n:02d}-*.patch'))
    if len(patches) != 1:
        return []
    first = patches[0].read_text().splitlines()[0]
    return re.findall(r'(\w+Test\.test_\w+)', first) if first.startswith('# tests:') else []


def test_names():
    """Every 'Class.test_method' of the test files that `python -m unittest test_models` runs."""
    suite = unittest.defaultTestLoader.loadTestsFromName('test_models')
    names = set()

    def walk(s):
        for t in s:
            if isinstance(t, unittest.TestSuite):
                walk(t)
            else:
                names.add(f'{type(t).__name__}.{t._testMethodName}')
    walk(suite)
    return names


class ReadmeTest(unittest.TestCase):

    def test_readmes_are_short_and_each_links_the_other(self):
        self.assertLessEqual(len(read('README.md')), 16_000)
        self.assertLessEqual(len(read('README.ja.md')), 15_000)
        self.assertIn('(README.ja.md)', read('README.md').split('\n## ')[0])
        self.assertIn('(README.md)', read('README.ja.md').split('\n## ')[0])

    def test_both_readmes_follow_the_learners_path(self):
        english, japanese = (read(name) for name in READMES)
        self.assertEqual(tuple(re.findall(r'^## (.+)$', english, re.M)), SECTIONS)
        for level in ('## ', '### '):
            self.assertEqual(len(re.findall(rf'^{level}', english, re.M)),
                             len(re.findall(rf'^{level}', japanese, re.M)), level)
        for name in READMES:
            for picture in re.findall(r'!\[[^]]*\]\(([^)]+)\)', read(name)):
                self.assertTrue((HERE / picture).is_file(), f'{name} shows {picture}')

    def test_fix_tables_agree_and_each_row_is_pinned_by_real_tests(self):
        english, japanese = (fix_rows(read(name)) for name in READMES)
        self.assertEqual(english, list(range(1, len(english) + 1)))
        self.assertGreaterEqual(len(english), 19)
        self.assertEqual(english, japanese)
        tests = {n: patch_tests(n) for n in english}
        self.assertTrue(all(tests.values()), f'rows whose patch names no test: {tests}')
        missing = {t for names in tests.values() for t in names} - test_names()
        self.assertEqual(missing, set())

    def test_both_readmes_show_the_same_commands_and_figures(self):
        english, japanese = (read(name) for name in READMES)
        command = r'python (?:train|degradation|predict|resnet|benchmark)\.py[^`|\n#]*'
        for pattern in (command, r'\d+\.\d+%'):
            with self.subTest(pattern):
                self.assertEqual({c.strip() for c in re.findall(pattern, english)},
                                 {c.strip() for c in re.findall(pattern, japanese)})

    def test_every_command_shown_parses(self):
        for name in READMES:
            commands = re.findall(r'python train\.py[^`|\n#]*', read(name))
            self.assertGreater(len(commands), 5, name)
            for command in commands:
                with self.subTest(readme=name, command=command):
                    argv = shlex.split(command)[2:]
                    try:
                        args = options.parse_args(argv)
                    except SystemExit:
                        self.fail(f'{name}: {command!r} does not parse')
                    options.check_args(args)
            for command in re.findall(r'python degradation\.py[^`|\n#]*', read(name)):
                with self.subTest(readme=name, command=command):
                    try:
                        args = degradation.parse_args(shlex.split(command)[2:])
                    except SystemExit:
                        self.fail(f'{name}: {command!r} does not parse')
                    for depth in args.depths:
                        degradation.blocks_of(depth)
            for command in re.findall(r'python predict\.py[^`|\n#]*', read(name)):
                with self.subTest(readme=name, command=command):
                    try:
                        predict.build_parser().parse_args(shlex.split(command)[2:])
                    except SystemExit:
                        self.fail(f'{name}: {command!r} does not parse')


if __name__ == '__main__':
    unittest.main()
