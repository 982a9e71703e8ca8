//! `SVMClassifier` and `SVMRegressor` (ONNX-ML), which tract 0.23.9 cannot parse,
//! as operators of our own with onnxruntime's semantics (checked against its
//! outputs in `agent/tests/sklearn.rs`):
//!
//! - Kernels `LINEAR` (x·v), `POLY` ((γ x·v + c₀)^d), `RBF` (exp(−γ |x−v|²)) and
//!   `SIGMOID` (tanh(γ x·v + c₀)), with `kernel_params` = [γ, c₀, d].
//! - Classifier, support-vector mode (libsvm, one-vs-one): each pair of classes
//!   (i < j) scores Σ coef·K over both classes' support vectors + ρ, and votes for
//!   i when the score is positive, else for j. The label is the class with the
//!   most votes (the first on a tie). Without `prob_a`, the scores are the pairs'
//!   (two classes: `[-s, s]`, or `[1-s, s]` under a post transform); with it,
//!   Platt's sigmoid on each pair and the pairwise coupling of Wu, Lin and Weng
//!   (as libsvm and onnxruntime) give one probability per class.
//! - Classifier, linear mode (no support vectors, liblinear): one score per class,
//!   x·coef + ρ₀; the label is the best score's class (two classes: onnxruntime's
//!   threshold rules).
//! - Regressor: Σ coef·K + ρ₀ (or x·coef + ρ₀ without support vectors);
//!   `one_class` answers 1 or −1.
//! - Post transforms `NONE`, `LOGISTIC`, `SOFTMAX`, `SOFTMAX_ZERO`, `PROBIT` on the
//!   classifier's scores; `PROBIT` on a two-class classifier without probabilities
//!   is refused (onnxruntime leaves the second score unwritten).
//!
//! Class labels are integers or strings. Every attribute is checked when the model
//! loads, and an error names the node and the attribute.

use std::sync::Arc;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::ml::{at, floats};

/// Adds the operators of this module to an ONNX op register.
pub fn register(register: &mut OnnxOpRegister) {
    register.insert("SVMClassifier", classifier);
    register.insert("SVMRegressor", regressor);
}

/// Most support vectors × features one model may hold (a 64 MiB attribute).
const MAX_WEIGHTS: usize = 1 << 24;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kernel {
    Linear,
    Poly { gamma: f32, coef0: f32, degree: f32 },
    Rbf { gamma: f32 },
    Sigmoid { gamma: f32, coef0: f32 },
}

impl Kernel {
    fn parse(node: &NodeProto) -> TractResult<Kernel> {
        let name = node
            .get_attr_opt::<&str>("kernel_type")?
            .unwrap_or("LINEAR");
        let params = floats(node, "kernel_params", false)?;
        let p = |i: usize| params.get(i).copied().unwrap_or(0.0);
        if !params.is_empty() && params.len() != 3 {
            bail!(
                "{}: kernel_params has {} values; it must be [gamma, coef0, degree]",
                at(node),
                params.len()
            );
        }
        Ok(match name {
            "LINEAR" => Kernel::Linear,
            "POLY" => Kernel::Poly {
                gamma: p(0),
                coef0: p(1),
                degree: p(2),
            },
            "RBF" => Kernel::Rbf { gamma: p(0) },
            "SIGMOID" => Kernel::Sigmoid {
                gamma: p(0),
                coef0: p(1),
            },
            other => bail!(
                "{}: kernel_type {other:?} is not LINEAR, POLY, RBF or SIGMOID",
                at(node)
            ),
        })
    }

    /// The kernel between one row and one vector (f32 sums in feature order, as
    /// onnxruntime).
    fn eval(&self, x: &[f32], v: &[f32]) -> f32 {
        if let Kernel::Rbf { gamma } = *self {
            let d2: f32 = x.iter().zip(v).map(|(a, b)| (a - b) * (a - b)).sum();
            return (-gamma * d2).exp();
        }
        self.of_dot(x.iter().zip(v).map(|(a, b)| a * b).sum::<f32>())
    }

    /// The kernel from the dot product of its two vectors. RBF's comes from their
    /// distance instead (`eval`, `Support::kernels`), never through here.
    fn of_dot(&self, dot: f32) -> f32 {
        match *self {
            Kernel::Linear | Kernel::Rbf { .. } => dot,
            Kernel::Poly {
                gamma,
                coef0,
                degree,
            } => {
                let base = gamma * dot + coef0;
                match degree {
                    2.0 => base * base,
                    3.0 => base * base * base,
                    d => base.powf(d),
                }
            }
            Kernel::Sigmoid { gamma, coef0 } => (gamma * dot + coef0).tanh(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Post {
    None,
    Logistic,
    Softmax,
    SoftmaxZero,
    Probit,
}

impl Post {
    fn parse(node: &NodeProto) -> TractResult<Post> {
        Ok(
            match node
                .get_attr_opt::<&str>("post_transform")?
                .unwrap_or("NONE")
            {
                "NONE" => Post::None,
                "LOGISTIC" => Post::Logistic,
                "SOFTMAX" => Post::Softmax,
                "SOFTMAX_ZERO" => Post::SoftmaxZero,
                "PROBIT" => Post::Probit,
                other => bail!(
                    "{}: post_transform {other:?} is not NONE, LOGISTIC, SOFTMAX, SOFTMAX_ZERO or PROBIT",
                    at(node)
                ),
            },
        )
    }

    /// onnxruntime's transform of one row of two or more scores.
    fn apply(self, scores: &mut [f32]) {
        match self {
            Post::None => {}
            Post::Logistic => scores.iter_mut().for_each(|s| *s = logistic(*s)),
            Post::Probit => scores.iter_mut().for_each(|s| *s = probit(*s)),
            Post::Softmax => softmax(scores, false),
            Post::SoftmaxZero => softmax(scores, true),
        }
    }
}

fn logistic(v: f32) -> f32 {
    let p = 1.0 / (1.0 + (-v.abs()).exp());
    if v < 0.0 { 1.0 - p } else { p }
}

/// √2 · erf⁻¹(2v − 1), with onnxruntime's approximation of erf⁻¹.
fn probit(v: f32) -> f32 {
    let x = 2.0 * v - 1.0;
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let ln = ((1.0 - x) * (1.0 + x)).ln();
    let a = 2.0 / (std::f32::consts::PI * 0.147) + 0.5 * ln;
    let b = ln / 0.147;
    std::f32::consts::SQRT_2 * sign * (-a + (a * a - b).sqrt()).sqrt()
}

/// Softmax; `skip_zeros`: values within 1e-7 of 0 are scaled, not exponentiated.
fn softmax(scores: &mut [f32], skip_zeros: bool) {
    let max = scores.iter().copied().fold(-f32::MAX, f32::max);
    let exp_neg_max = (-max).exp();
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        if skip_zeros && s.abs() <= 1e-7 {
            *s *= exp_neg_max;
        } else {
            *s = (*s - max).exp();
            sum += *s;
        }
    }
    scores.iter_mut().for_each(|s| *s /= sum);
}

/// Class labels, integers or strings.
#[derive(Debug, Clone, PartialEq)]
enum Labels {
    Ints(Vec<i64>),
    Strings(Vec<String>),
}

impl Labels {
    fn parse(node: &NodeProto) -> TractResult<Labels> {
        let ints = node.get_attr_opt_vec::<i64>("classlabels_ints")?;
        let strings = node.get_attr_opt_vec::<String>("classlabels_strings")?;
        let labels = match (ints, strings) {
            (Some(i), None) if !i.is_empty() => Labels::Ints(i),
            (None, Some(s)) if !s.is_empty() => Labels::Strings(s),
            _ => bail!(
                "{}: exactly one of classlabels_ints and classlabels_strings must list the classes",
                at(node)
            ),
        };
        ensure!(labels.len() < 65536, "{}: over 65535 classes", at(node));
        Ok(labels)
    }

    fn len(&self) -> usize {
        match self {
            Labels::Ints(v) => v.len(),
            Labels::Strings(v) => v.len(),
        }
    }

    fn datum_type(&self) -> DatumType {
        match self {
            Labels::Ints(_) => i64::datum_type(),
            Labels::Strings(_) => String::datum_type(),
        }
    }

    /// The labels of the given classes, as a 1-D tensor.
    fn pick(&self, classes: &[usize]) -> Tensor {
        match self {
            Labels::Ints(v) => tensor1(&classes.iter().map(|c| v[*c]).collect::<Vec<_>>()),
            Labels::Strings(v) => {
                tensor1(&classes.iter().map(|c| v[*c].clone()).collect::<Vec<_>>())
            }
        }
    }
}

/// Support vectors, grouped by class for the classifier.
#[derive(Debug, Clone, PartialEq)]
struct Support {
    /// Feature-major, `[features, count]`: the kernel loop runs across the
    /// vectors (vectorised), summing each vector's terms in feature order as
    /// onnxruntime does.
    by_feature: Vec<f32>,
    count: usize,
    /// Classifier: the first vector and the number of vectors of each class.
    per_class: Vec<(usize, usize)>,
}

impl Support {
    /// The kernel between `x` and every support vector, into `out`.
    fn kernels(&self, kernel: &Kernel, x: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.resize(self.count, 0.0);
        let columns = x.iter().zip(self.by_feature.chunks_exact(self.count));
        if let Kernel::Rbf { gamma } = *kernel {
            for (xf, column) in columns {
                for (o, v) in out.iter_mut().zip(column) {
                    let d = xf - v;
                    *o += d * d;
                }
            }
            for o in out.iter_mut() {
                *o = (-gamma * *o).exp();
            }
            return;
        }
        for (xf, column) in columns {
            for (o, v) in out.iter_mut().zip(column) {
                *o += xf * v;
            }
        }
        for o in out.iter_mut() {
            *o = kernel.of_dot(*o);
        }
    }
}

/// Reads `support_vectors`, checking it holds `count` whole vectors.
fn support_vectors(
    node: &NodeProto,
    count: usize,
    per_class: Vec<(usize, usize)>,
) -> TractResult<(Support, usize)> {
    let vectors = floats(node, "support_vectors", false)?;
    ensure!(
        vectors.len() <= MAX_WEIGHTS,
        "{}: support_vectors has {} values, over {MAX_WEIGHTS}",
        at(node),
        vectors.len()
    );
    ensure!(
        !vectors.is_empty() && vectors.len() % count == 0,
        "{}: support_vectors has {} values, not a whole number of features for {count} vectors",
        at(node),
        vectors.len()
    );
    let features = vectors.len() / count;
    let by_feature = (0..features)
        .flat_map(|f| vectors.iter().skip(f).step_by(features).copied())
        .collect();
    Ok((
        Support {
            by_feature,
            count,
            per_class,
        },
        features,
    ))
}

fn check_len(node: &NodeProto, name: &str, got: usize, want: usize) -> TractResult<()> {
    ensure!(
        got == want,
        "{}: {name} has {got} values, {want} expected",
        at(node)
    );
    Ok(())
}

/// At least `want` values (onnxruntime reads the first `want` and ignores the rest).
fn check_min_len(node: &NodeProto, name: &str, got: usize, want: usize) -> TractResult<()> {
    ensure!(
        got >= want,
        "{}: {name} has {got} values, at least {want} expected",
        at(node)
    );
    Ok(())
}

// ----- the classifier ----------------------------------------------------------

/// A parsed `SVMClassifier`, evaluated one row at a time.
#[derive(Debug, Clone, PartialEq)]
struct SvmClassifier {
    kernel: Kernel,
    /// `None`: linear mode.
    support: Option<Support>,
    /// Support-vector mode: `[classes - 1, vectors]`; linear: `[classes, features]`.
    coefficients: Vec<f32>,
    rho: Vec<f32>,
    /// Platt's (A, B) per pair of classes; empty without probabilities.
    platt: Vec<(f32, f32)>,
    post: Post,
    labels: Labels,
    features: usize,
    all_positive: bool,
}

impl SvmClassifier {
    fn parse(node: &NodeProto) -> TractResult<SvmClassifier> {
        let labels = Labels::parse(node)?;
        let classes = labels.len();
        let coefficients = floats(node, "coefficients", false)?;
        let rho = floats(node, "rho", false)?;
        let (a, b) = (
            floats(node, "prob_a", false)?,
            floats(node, "prob_b", false)?,
        );
        check_len(node, "prob_b", b.len(), a.len())?;
        let per_class = node
            .get_attr_opt_vec::<i64>("vectors_per_class")?
            .unwrap_or_default();
        let post = Post::parse(node)?;
        let pairs = classes * (classes - 1) / 2;
        let (support, features) = if per_class.is_empty() {
            ensure!(
                !coefficients.is_empty() && coefficients.len() % classes == 0,
                "{}: coefficients has {} values, not one row of weights per class ({classes})",
                at(node),
                coefficients.len()
            );
            check_min_len(node, "rho", rho.len(), 1)?;
            (None, coefficients.len() / classes)
        } else {
            check_len(node, "vectors_per_class", per_class.len(), classes)?;
            ensure!(classes >= 2, "{}: one class only", at(node));
            let mut groups = Vec::with_capacity(classes);
            let mut count = 0usize;
            for n in &per_class {
                let n = usize::try_from(*n)
                    .ok()
                    .filter(|n| *n <= MAX_WEIGHTS)
                    .ok_or_else(|| format_err!("{}: vectors_per_class holds {n}", at(node)))?;
                groups.push((count, n));
                count += n;
            }
            ensure!(
                count > 0,
                "{}: vectors_per_class counts no vector",
                at(node)
            );
            let (support, features) = support_vectors(node, count, groups)?;
            check_min_len(
                node,
                "coefficients",
                coefficients.len(),
                (classes - 1) * count,
            )?;
            check_min_len(node, "rho", rho.len(), pairs)?;
            if !a.is_empty() {
                check_min_len(node, "prob_a", a.len(), pairs)?;
            }
            ensure!(
                !(classes == 2 && a.is_empty() && post == Post::Probit),
                "{}: post_transform PROBIT on two classes without prob_a is not supported \
                 (onnxruntime leaves the second score unwritten)",
                at(node)
            );
            (Some(support), features)
        };
        Ok(SvmClassifier {
            kernel: if support.is_some() {
                Kernel::parse(node)?
            } else {
                Kernel::Linear
            },
            support,
            all_positive: coefficients.iter().all(|c| *c >= 0.0),
            coefficients,
            rho,
            platt: a.into_iter().zip(b).collect(),
            post,
            labels,
            features,
        })
    }

    fn classes(&self) -> usize {
        self.labels.len()
    }

    /// Scores per row.
    fn width(&self) -> usize {
        let c = self.classes();
        match (&self.support, self.platt.is_empty()) {
            (Some(_), true) if c > 2 => c * (c - 1) / 2,
            (Some(_), true) => 2,
            _ => c,
        }
    }

    /// One row: its class and its scores (`self.width()` of them, into `scores`).
    fn row(&self, x: &[f32], kernels: &mut Vec<f32>, scores: &mut [f32]) -> usize {
        match &self.support {
            None => self.linear_row(x, scores),
            Some(support) => {
                support.kernels(&self.kernel, x, kernels);
                self.svc_row(support, kernels, scores)
            }
        }
    }

    fn linear_row(&self, x: &[f32], scores: &mut [f32]) -> usize {
        for (s, w) in scores
            .iter_mut()
            .zip(self.coefficients.chunks_exact(x.len()))
        {
            *s = Kernel::Linear.eval(x, w) + self.rho[0];
        }
        let (best, max) = first_max(scores);
        let class = if self.classes() == 2 && self.platt.is_empty() {
            let positive = if self.all_positive {
                max >= 0.5
            } else {
                max > 0.0
            };
            if positive { 1 } else { best }
        } else {
            best
        };
        if scores.len() >= 2 {
            self.post.apply(scores);
        } else if self.post == Post::Probit {
            scores[0] = probit(scores[0]);
        }
        class
    }

    fn svc_row(&self, support: &Support, kernels: &[f32], scores: &mut [f32]) -> usize {
        let c = self.classes();
        let v = support.count;
        let mut votes = vec![0u32; c];
        let mut pair_scores = Vec::with_capacity(c * (c - 1) / 2);
        for i in 0..c {
            let (start_i, n_i) = support.per_class[i];
            for j in i + 1..c {
                let (start_j, n_j) = support.per_class[j];
                let part = |row: usize, start: usize, n: usize| -> f64 {
                    let w = &self.coefficients[row * v + start..row * v + start + n];
                    w.iter()
                        .zip(&kernels[start..start + n])
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum()
                };
                let sum = part(j - 1, start_i, n_i)
                    + part(i, start_j, n_j)
                    + f64::from(self.rho[pair_scores.len()]);
                votes[if sum > 0.0 { i } else { j }] += 1;
                pair_scores.push(sum as f32);
            }
        }
        if self.platt.is_empty() {
            if c == 2 {
                let s = pair_scores[0];
                scores[1] = s;
                scores[0] = if self.post == Post::None { -s } else { 1.0 - s };
            } else {
                scores.copy_from_slice(&pair_scores);
                self.post.apply(scores);
            }
        } else {
            self.probabilities(&pair_scores, scores);
            self.post.apply(scores);
        }
        let most = votes.iter().copied().max().unwrap_or(0);
        votes.iter().position(|n| *n == most).unwrap_or(0)
    }

    /// Platt's sigmoid per pair, then the classes' probabilities by pairwise coupling.
    fn probabilities(&self, pair_scores: &[f32], p: &mut [f32]) {
        let c = self.classes();
        let mut r = vec![0f32; c * c];
        let mut k = 0;
        for i in 0..c {
            for j in i + 1..c {
                let (a, b) = self.platt[k];
                let q = (1.0 - logistic(pair_scores[k] * a + b)).clamp(1e-7, 1.0 - 1e-7);
                r[i * c + j] = q;
                r[j * c + i] = 1.0 - q;
                k += 1;
            }
        }
        couple(c, &r, p);
    }
}

/// The first largest value and its index.
fn first_max(v: &[f32]) -> (usize, f32) {
    let mut best = (0, v[0]);
    for (i, x) in v.iter().enumerate().skip(1) {
        if *x > best.1 {
            best = (i, *x);
        }
    }
    best
}

/// Pairwise coupling (Wu, Lin and Weng 2004, method 2, as libsvm and onnxruntime
/// compute it in f32): `r[i·c + j]` is P(i | i or j); the class probabilities go
/// to `p`.
fn couple(c: usize, r: &[f32], p: &mut [f32]) {
    let mut q = vec![0f32; c * c];
    let mut qp = vec![0f32; c];
    let eps = 0.005 / c as f32;
    for i in 0..c {
        p[i] = 1.0 / c as f32;
        for j in 0..i {
            q[i * c + i] += r[j * c + i] * r[j * c + i];
            q[i * c + j] = q[j * c + i];
        }
        for j in i + 1..c {
            q[i * c + i] += r[j * c + i] * r[j * c + i];
            q[i * c + j] = -r[j * c + i] * r[i * c + j];
        }
    }
    for _ in 0..100 {
        let mut pqp = 0.0;
        for i in 0..c {
            qp[i] = (0..c).map(|j| q[i * c + j] * p[j]).sum();
            pqp += p[i] * qp[i];
        }
        let max_error = qp.iter().map(|x| (x - pqp).abs()).fold(0.0, f32::max);
        if max_error < eps {
            break;
        }
        for i in 0..c {
            let diff = (-qp[i] + pqp) / q[i * c + i];
            p[i] += diff;
            pqp = (pqp + diff * (diff * q[i * c + i] + 2.0 * qp[i])) / (1.0 + diff) / (1.0 + diff);
            for j in 0..c {
                qp[j] = (qp[j] + diff * q[i * c + j]) / (1.0 + diff);
                p[j] /= 1.0 + diff;
            }
        }
    }
}

/// Rows of an `SVM*` input: `[N, F]`, or `[F]` as one row.
fn rows_of(input: &Tensor, features: usize, op: &str) -> TractResult<usize> {
    let (rows, width) = match input.shape() {
        [w] => (1, *w),
        [n, w] => (*n, *w),
        other => bail!("{op} input must be [rows, features], got {other:?}"),
    };
    ensure!(
        width == features,
        "{op} input has {width} features, the model has {features}"
    );
    Ok(rows)
}

fn rows_dim(fact: &TypedFact) -> TDim {
    if fact.rank() == 1 {
        1.into()
    } else {
        fact.shape[0].clone()
    }
}

/// The typed operator: labels `[N]` and scores `[N, width]`.
#[derive(Debug, Clone)]
struct SvmClassifierOp(Arc<SvmClassifier>);

eq_by_shared_attributes!(SvmClassifierOp);

impl Op for SvmClassifierOp {
    fn name(&self) -> StaticName {
        "EdgefleetSVMClassifier".into()
    }

    op_as_typed_op!();
}

impl EvalOp for SvmClassifierOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        crate::clear_upper_simd_state();
        let input = args_1!(inputs);
        let input = input.cast_to::<f32>()?;
        let svm = &self.0;
        let rows = rows_of(&input, svm.features, "SVMClassifier")?;
        let width = svm.width();
        let x = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut scores = vec![0f32; rows * width];
        let mut classes = Vec::with_capacity(rows);
        let mut kernels = Vec::new();
        for (row, out) in x
            .chunks_exact(svm.features.max(1))
            .zip(scores.chunks_exact_mut(width))
        {
            classes.push(svm.row(row, &mut kernels, out));
        }
        let scores = Tensor::from_shape(&[rows, width], &scores)?;
        Ok(tvec!(
            svm.labels.pick(&classes).into_tvalue(),
            scores.into_tvalue()
        ))
    }
}

impl TypedOp for SvmClassifierOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = rows_dim(inputs[0]);
        Ok(tvec!(
            self.0.labels.datum_type().fact([n.clone()]),
            f32::fact([n, self.0.width().to_dim()])
        ))
    }

    as_op!();
}

/// The ONNX node before typing.
#[derive(Debug, Clone)]
struct SvmClassifierNode(Arc<SvmClassifier>);

fn classifier(
    _ctx: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let svm = SvmClassifier::parse(node)?;
    Ok((expand(SvmClassifierNode(Arc::new(svm))), vec![]))
}

impl Expansion for SvmClassifierNode {
    fn name(&self) -> StaticName {
        "SVMClassifier".into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(2)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 2)?;
        s.equals(&outputs[0].datum_type, self.0.labels.datum_type())?;
        s.equals(&outputs[0].rank, 1)?;
        s.equals(&outputs[1].datum_type, f32::datum_type())?;
        s.equals(&outputs[1].rank, 2)?;
        s.equals(&outputs[1].shape[1], self.0.width().to_dim())?;
        s.equals(&outputs[0].shape[0], &outputs[1].shape[0])?;
        rows_rule(s, inputs, outputs)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        check_features(model, inputs[0], self.0.features, prefix)?;
        model.wire_node(prefix, SvmClassifierOp(self.0.clone()), inputs)
    }
}

/// Output rows: the input's first dimension, or 1 for a 1-D input.
fn rows_rule<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    s.given(&inputs[0].rank, move |s, rank| {
        if rank == 1 {
            s.equals(&outputs[0].shape[0], 1.to_dim())
        } else {
            s.equals(&outputs[0].shape[0], &inputs[0].shape[0])
        }
    })
}

fn check_features(
    model: &TypedModel,
    input: OutletId,
    features: usize,
    prefix: &str,
) -> TractResult<()> {
    let fact = model.outlet_fact(input)?;
    ensure!(
        fact.rank() == 1 || fact.rank() == 2,
        "{prefix}: the input must be [rows, features], got rank {}",
        fact.rank()
    );
    if let Some(w) = fact.shape.last().and_then(|d| d.to_usize().ok()) {
        ensure!(
            w == features,
            "{prefix}: the input has {w} features, the model has {features}"
        );
    }
    Ok(())
}

// ----- the regressor -----------------------------------------------------------

/// A parsed `SVMRegressor`.
#[derive(Debug, Clone, PartialEq)]
struct SvmRegressor {
    kernel: Kernel,
    /// `None`: linear mode (`coefficients` are one weight per feature).
    support: Option<Support>,
    coefficients: Vec<f32>,
    rho: f32,
    one_class: bool,
    features: usize,
}

impl SvmRegressor {
    fn parse(node: &NodeProto) -> TractResult<SvmRegressor> {
        let count = node.get_attr_opt::<i64>("n_supports")?.unwrap_or(0);
        let count = usize::try_from(count)
            .ok()
            .filter(|n| *n <= MAX_WEIGHTS)
            .ok_or_else(|| format_err!("{}: n_supports is {count}", at(node)))?;
        let coefficients = floats(node, "coefficients", false)?;
        ensure!(!coefficients.is_empty(), "{}: no coefficients", at(node));
        let rho = floats(node, "rho", false)?;
        check_min_len(node, "rho", rho.len(), 1)?;
        let one_class = match node.get_attr_opt::<i64>("one_class")?.unwrap_or(0) {
            0 => false,
            1 => true,
            other => bail!("{}: one_class is {other}, not 0 or 1", at(node)),
        };
        Post::parse(node)?;
        let (support, features, kernel) = if count == 0 {
            (None, coefficients.len(), Kernel::Linear)
        } else {
            let (support, features) = support_vectors(node, count, vec![])?;
            check_min_len(node, "coefficients", coefficients.len(), count)?;
            (Some(support), features, Kernel::parse(node)?)
        };
        Ok(SvmRegressor {
            kernel,
            support,
            coefficients,
            rho: rho[0],
            one_class,
            features,
        })
    }

    fn row(&self, x: &[f32], kernels: &mut Vec<f32>) -> f32 {
        let y = match &self.support {
            None => Kernel::Linear.eval(x, &self.coefficients),
            Some(support) => {
                support.kernels(&self.kernel, x, kernels);
                Kernel::Linear.eval(kernels, &self.coefficients)
            }
        } + self.rho;
        match (self.one_class, y > 0.0) {
            (false, _) => y,
            (true, true) => 1.0,
            (true, false) => -1.0,
        }
    }
}

#[derive(Debug, Clone)]
struct SvmRegressorOp(Arc<SvmRegressor>);

eq_by_shared_attributes!(SvmRegressorOp);

impl Op for SvmRegressorOp {
    fn name(&self) -> StaticName {
        "EdgefleetSVMRegressor".into()
    }

    op_as_typed_op!();
}

impl EvalOp for SvmRegressorOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        crate::clear_upper_simd_state();
        let input = args_1!(inputs);
        let input = input.cast_to::<f32>()?;
        let svm = &self.0;
        let rows = rows_of(&input, svm.features, "SVMRegressor")?;
        let mut kernels = Vec::new();
        let y: Vec<f32> = input
            .try_as_plain_ram()?
            .as_slice::<f32>()?
            .chunks_exact(svm.features.max(1))
            .map(|row| svm.row(row, &mut kernels))
            .collect();
        Ok(tvec!(Tensor::from_shape(&[rows, 1], &y)?.into_tvalue()))
    }
}

impl TypedOp for SvmRegressorOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact([rows_dim(inputs[0]), 1.to_dim()])))
    }

    as_op!();
}

#[derive(Debug, Clone)]
struct SvmRegressorNode(Arc<SvmRegressor>);

fn regressor(
    _ctx: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let svm = SvmRegressor::parse(node)?;
    Ok((expand(SvmRegressorNode(Arc::new(svm))), vec![]))
}

impl Expansion for SvmRegressorNode {
    fn name(&self) -> StaticName {
        "SVMRegressor".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, 2)?;
        s.equals(&outputs[0].shape[1], 1.to_dim())?;
        rows_rule(s, inputs, outputs)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        check_features(model, inputs[0], self.0.features, prefix)?;
        model.wire_node(prefix, SvmRegressorOp(self.0.clone()), inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{floats, int, ints, node, string};
    use proptest::prelude::*;

    fn run(op: &dyn EvalOp, rows: usize, width: usize, x: &[f32]) -> TractResult<TVec<TValue>> {
        let input = Tensor::from_shape(&[rows, width], x)?;
        op.eval(&EvalContext::out_of_plan(), tvec!(input.into_tvalue()))
    }

    #[test]
    fn two_classes_couple_to_the_pairwise_probability() {
        let mut p = [0.0; 2];
        couple(2, &[0.0, 0.8, 0.2, 0.0], &mut p);
        assert!(
            (p[0] - 0.8).abs() < 1e-3 && (p[1] - 0.2).abs() < 1e-3,
            "{p:?}"
        );
    }

    #[test]
    fn coupled_probabilities_sum_to_one_and_follow_the_pairs() {
        // Class 0 beats 1 and 2 clearly; 1 and 2 are even.
        let r = [0.0, 0.9, 0.9, 0.1, 0.0, 0.5, 0.1, 0.5, 0.0];
        let mut p = [0.0; 3];
        couple(3, &r, &mut p);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-3, "{p:?}");
        assert!(p[0] > 0.7 && (p[1] - p[2]).abs() < 1e-3, "{p:?}");
    }

    #[test]
    fn transforms_are_onnxruntimes() {
        assert_eq!(probit(0.5), 0.0);
        assert!((probit(0.975) - 1.96).abs() < 0.01, "{}", probit(0.975));
        assert!((logistic(-2.0) + logistic(2.0) - 1.0).abs() < 1e-6);
        let mut s = [1.0, 0.0, 2.0];
        softmax(&mut s, true);
        assert_eq!(s[1], 0.0, "a zero stays zero under SOFTMAX_ZERO");
        assert!((s[0] + s[2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn the_label_is_the_class_with_most_votes_and_the_first_on_a_tie() {
        // Three classes, one support vector each at the origin, linear kernel:
        // every kernel value is x·0 = 0, so each pair's score is its rho.
        let svm = |rho: Vec<f32>| {
            SvmClassifier::parse(&node(
                "SVMClassifier",
                "n",
                vec![
                    ints("classlabels_ints", vec![10, 20, 30]),
                    ints("vectors_per_class", vec![1, 1, 1]),
                    floats("support_vectors", vec![0.0; 6]),
                    floats("coefficients", vec![1.0; 6]),
                    floats("rho", rho),
                ],
            ))
            .expect("parses")
        };
        let labels = |out: &TVec<TValue>| -> Vec<i64> {
            out[0]
                .try_as_plain_ram()
                .expect("tensor")
                .as_slice::<i64>()
                .expect("tensor")
                .to_vec()
        };
        let op = SvmClassifierOp(Arc::new(svm(vec![-1.0, -1.0, 1.0])));
        // (0,1) -> 1, (0,2) -> 2, (1,2) -> 1: class 1 wins with two votes.
        let out = run(&op, 1, 2, &[3.0, 4.0]).expect("runs");
        assert_eq!(labels(&out), [20]);
        // One vote each: the first class.
        let op = SvmClassifierOp(Arc::new(svm(vec![1.0, -1.0, 1.0])));
        let out = run(&op, 1, 2, &[3.0, 4.0]).expect("runs");
        assert_eq!(labels(&out), [10]);
        assert_eq!(out[1].shape(), &[1, 3], "one score per pair");
    }

    #[test]
    fn a_row_of_the_wrong_width_is_an_error_not_a_panic() {
        let svm = SvmRegressor::parse(&node(
            "SVMRegressor",
            "n",
            vec![
                floats("coefficients", vec![1.0, 2.0]),
                floats("rho", vec![0.5]),
            ],
        ))
        .expect("linear regressor");
        let op = SvmRegressorOp(Arc::new(svm));
        let out = run(&op, 1, 2, &[1.0, 1.0]).expect("runs");
        assert_eq!(
            out[0]
                .try_as_plain_ram()
                .expect("tensor")
                .as_slice::<f32>()
                .expect("tensor"),
            &[3.5]
        );
        let err = run(&op, 1, 3, &[1.0, 1.0, 1.0]).expect_err("3 features");
        assert!(
            err.to_string().contains("3 features, the model has 2"),
            "{err}"
        );
    }

    fn values(max: usize) -> impl Strategy<Value = Vec<f32>> {
        proptest::collection::vec(-2.0f32..2.0, 0..max)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Attributes of any sizes are refused or run, never a panic; what runs
        /// answers one label and `width()` scores per row.
        #[test]
        fn arbitrary_classifier_attributes_never_panic(
            classes in 1usize..5,
            per_class in proptest::collection::vec(0i64..4, 0..5),
            vectors in values(30),
            coefficients in values(30),
            rho in values(8),
            prob in values(8),
            kernel in prop::sample::select(vec!["LINEAR", "POLY", "RBF", "SIGMOID", "CUBIC"]),
            post in prop::sample::select(vec!["NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO", "PROBIT"]),
            width in 1usize..5,
            x in proptest::collection::vec(-3.0f32..3.0, 12),
        ) {
            let mut attrs = vec![
                ints("classlabels_ints", (0..classes as i64).collect()),
                floats("support_vectors", vectors),
                floats("coefficients", coefficients),
                floats("rho", rho),
                floats("prob_a", prob.clone()),
                floats("prob_b", prob),
                string("kernel_type", kernel),
                string("post_transform", post),
                floats("kernel_params", vec![0.3, 0.1, 2.0]),
            ];
            if !per_class.is_empty() {
                attrs.push(ints("vectors_per_class", per_class));
            }
            if let Ok(svm) = SvmClassifier::parse(&node("SVMClassifier", "n", attrs)) {
                let scores = svm.width();
                let op = SvmClassifierOp(Arc::new(svm));
                let rows = x.len() / width;
                if let Ok(out) = run(&op, rows, width, &x[..rows * width]) {
                    prop_assert_eq!(out[0].shape(), &[rows]);
                    prop_assert_eq!(out[1].shape(), &[rows, scores]);
                }
            }
        }

        #[test]
        fn arbitrary_regressor_attributes_never_panic(
            n_supports in -1i64..5,
            vectors in values(20),
            coefficients in values(8),
            rho in values(3),
            one_class in 0i64..3,
            width in 1usize..5,
            x in proptest::collection::vec(-3.0f32..3.0, 12),
        ) {
            let attrs = vec![
                int("n_supports", n_supports),
                int("one_class", one_class),
                floats("support_vectors", vectors),
                floats("coefficients", coefficients),
                floats("rho", rho),
                string("kernel_type", "RBF"),
                floats("kernel_params", vec![0.3, 0.0, 3.0]),
            ];
            if let Ok(svm) = SvmRegressor::parse(&node("SVMRegressor", "n", attrs)) {
                let op = SvmRegressorOp(Arc::new(svm));
                let rows = x.len() / width;
                if let Ok(out) = run(&op, rows, width, &x[..rows * width]) {
                    prop_assert_eq!(out[0].shape(), &[rows, 1]);
                }
            }
        }
    }
}
