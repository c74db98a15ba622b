//! A module's parameters by path (`aligner.layers.0.weight`: the fields from the module down),
//! with their values or their gradients as host values: what a test compares with another
//! library's, and what an export names.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
#[cfg(feature = "train")]
use burn::tensor::Gradients;
use burn::tensor::Tensor;

/// A parameter's values (or its gradient's) on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostParam {
    /// The fields from the module down to the parameter, joined by dots.
    pub path: String,
    /// The parameter's id (kept by optimizer steps).
    pub id: ParamId,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values as f32, row-major.
    pub values: Vec<f32>,
}

/// Every float parameter of `module`, in visiting order, with its values.
pub fn values<M: Module>(module: &M) -> Vec<HostParam> {
    collect_values(module, false)
}

/// [`values`] of the parameters that take gradients (those training updates).
pub fn trained_values<M: Module>(module: &M) -> Vec<HostParam> {
    collect_values(module, true)
}

fn collect_values<M: Module>(module: &M, only_trained: bool) -> Vec<HostParam> {
    let mut v = Collect {
        only_trained,
        path: Vec::new(),
        #[cfg(feature = "train")]
        grads: None,
        out: Vec::new(),
        #[cfg(not(feature = "train"))]
        _grads: std::marker::PhantomData,
    };
    module.visit(&mut v);
    v.out
}

/// The gradient in `grads` of every float parameter of `module` that has one (a parameter that
/// requires no gradient, or that the loss does not reach, has none).
#[cfg(feature = "train")]
pub fn gradients<M: Module>(module: &M, grads: &Gradients) -> Vec<HostParam> {
    let mut v = Collect {
        only_trained: false,
        path: Vec::new(),
        grads: Some(grads),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

struct Collect<'a> {
    only_trained: bool,
    path: Vec<String>,
    #[cfg(feature = "train")]
    grads: Option<&'a Gradients>,
    out: Vec<HostParam>,
    #[cfg(not(feature = "train"))]
    _grads: std::marker::PhantomData<&'a ()>,
}

impl Collect<'_> {
    fn push<const D: usize>(&mut self, id: ParamId, t: Tensor<D>) {
        let shape = t.dims().to_vec();
        let values = t
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .expect("a tensor converted to f32 reads back as f32");
        self.out.push(HostParam {
            path: self.path.join("."),
            id,
            shape,
            values,
        });
    }
}

impl ModuleVisitor for Collect<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        #[cfg(feature = "train")]
        if let Some(grads) = self.grads {
            if let Some(g) = param.val().grad(grads) {
                self.push(param.id, g);
            }
            return;
        }
        let t = param.val();
        if self.only_trained && !t.is_require_grad() {
            return;
        }
        self.push(param.id, t);
    }
}
